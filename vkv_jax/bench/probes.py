"""Machine probes the bench reads its bounds from: read / copy bandwidth, a matmul FLOP rate, device memory,
the machine itself. Sizes are parameters (the tests run them small)."""

from __future__ import annotations

import os
import pathlib
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def now() -> float:
    return time.perf_counter()


def bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> dict[str, float]:
    """Device memory bandwidth from XLA itself: `read` = a sum over a large f32 array (bytes read per
    second); `copy` = x <- x + 1 in place (donated, so no fresh pages are touched; bytes read + written
    per second, STREAM's convention). Best and median of `reps`."""
    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    y = jnp.zeros(n, jnp.float32)
    read = jax.jit(lambda a: jnp.sum(a)).lower(x).compile()
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0).lower(y).compile()
    jax.block_until_ready(read(x))
    y = jax.block_until_ready(copy(y))
    tr, tc = [], []
    for _ in range(reps):
        t = now()
        jax.block_until_ready(read(x))
        tr.append(now() - t)
        t = now()
        y = jax.block_until_ready(copy(y))
        tc.append(now() - t)
    del x, y
    return {"read_gbps": nbytes / min(tr) / 1e9, "copy_gbps": 2 * nbytes / min(tc) / 1e9,
            "read_gbps_median": nbytes / float(np.median(tr)) / 1e9,
            "copy_gbps_median": 2 * nbytes / float(np.median(tc)) / 1e9, "bytes": nbytes, "reps": reps}


def matmul_flop_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an [n, n] x [n, n] jitted matmul (2 n^3 FLOPs) on the default device."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_device_memory() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    info = {"backend": jax.default_backend(), "device": str(getattr(dev, "device_kind", dev.platform)),
            "devices": len(jax.devices()), "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__}
    try:
        info["loadavg_start"] = os.getloadavg()
        info["mem_total_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (OSError, ValueError, AttributeError):
        pass
    return info
