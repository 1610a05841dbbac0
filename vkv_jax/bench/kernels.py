"""Reference-vs-kernel timings for the Pallas kernels (no asserts; speed claims live in vkv_jax.bench).

    python -m vkv_jax.bench.kernels [--reps 5] [--scale 1]

On CPU the kernel runs in interpret mode, so its numbers only say the interpreter is slower than XLA;
on TPU the kernel is compiled. Shapes grow with --scale (1 = small enough for a 2-core CPU).
Prints one line per kernel: shape, reference ms, kernel ms, max |kernel - reference|.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax.pallas_kernels.compaction import compact_kv
from vkv_jax.pallas_kernels.decode_attention import decode_attention
from vkv_jax.pallas_kernels.window_scores import window_scores


def _time(f, args, reps):
    out = jax.block_until_ready(f(*args))  # compile + first run
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return out, 1e3 * float(np.median(ts))


def _err(a, b):
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    errs = []
    for x, y in leaves:
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        fin = np.isfinite(y)
        errs.append(np.abs(np.where(fin, x, 0) - np.where(fin, y, 0)).max())
    return float(max(errs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scale", type=int, default=1, help="multiplies S, C and batch sizes")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    dt = jnp.dtype(a.dtype)
    interpret = jax.default_backend() == "cpu"
    print(f"backend={jax.default_backend()} interpret={interpret} dtype={a.dtype}")
    ks = jax.random.split(jax.random.PRNGKey(0), 6)

    B, Hq, Hkv, W, S, D = 2, 8, 2, 32, 1024 * a.scale, 128
    q = jax.random.normal(ks[0], (B, Hq, W, D)).astype(dt)
    k = jax.random.normal(ks[1], (B, Hkv, S, D)).astype(dt)
    q_slot = jnp.broadcast_to(jnp.arange(S - W, S, dtype=jnp.int32), (B, W))
    valid = jnp.ones((B, S), bool)
    opts = dict(threshold_p=0.01, per_head=True)
    runs = {impl: jax.jit(lambda *x, impl=impl: window_scores(*x, impl=impl, interpret=interpret, **opts))
            for impl in ("reference", "kernel")}
    r, tr = _time(runs["reference"], (q, k, q_slot, valid), a.reps)
    o, tk = _time(runs["kernel"], (q, k, q_slot, valid), a.reps)
    print(f"window_scores   B={B} Hq={Hq} Hkv={Hkv} W={W} S={S} D={D}: "
          f"reference {tr:8.2f} ms  kernel {tk:8.2f} ms  max err {_err(o, r):.2e}")

    L, C, K, Cn = 2, 1024 * a.scale, 256 * a.scale, 384 * a.scale
    kc = jax.random.normal(ks[2], (L, B, Hkv, C, D)).astype(dt)
    vc = jax.random.normal(ks[3], (L, B, Hkv, C, D)).astype(dt)
    idx = jnp.sort(jax.random.permutation(ks[4], C)[:K])
    idx = jnp.broadcast_to(idx, (L, B, Hkv, K)).astype(jnp.int32)
    cnt = jnp.full((L, B, Hkv), K, jnp.int32)
    runs = {impl: jax.jit(lambda *x, impl=impl: compact_kv(*x, Cn, impl=impl, interpret=interpret))
            for impl in ("reference", "kernel")}
    r, tr = _time(runs["reference"], (kc, vc, idx, cnt), a.reps)
    o, tk = _time(runs["kernel"], (kc, vc, idx, cnt), a.reps)
    print(f"compact_kv      L={L} B={B} Hkv={Hkv} C={C} K={K} cap={Cn} D={D}: "
          f"reference {tr:8.2f} ms  kernel {tk:8.2f} ms  max err {_err(o, r):.2e}")

    qd = jax.random.normal(ks[5], (B, Hq, D)).astype(dt)
    length = jnp.array([[C, C // 8], [C // 2, C // 4]], jnp.int32)[:B, :Hkv]
    pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, Hkv, C))
    runs = {impl: jax.jit(lambda *x, impl=impl: decode_attention(*x, impl=impl, interpret=interpret))
            for impl in ("reference", "kernel")}
    args = (qd, kc[0], vc[0], (length, pos))
    r, tr = _time(runs["reference"], args, a.reps)
    o, tk = _time(runs["kernel"], args, a.reps)
    print(f"decode_attention B={B} Hq={Hq} Hkv={Hkv} C={C} D={D} lengths={np.asarray(length).tolist()}: "
          f"reference {tr:8.2f} ms  kernel {tk:8.2f} ms  max err {_err(o, r):.2e}")


if __name__ == "__main__":
    main()
