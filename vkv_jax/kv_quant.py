"""Quantized KV storage: int8 or float8 (e4m3fn) slots with one float32 scale per token per kv head.

A slot's key (or value) x [D] is stored as q = x / s in the storage dtype with s = max|x| / qmax (qmax 127
for int8, rounded to nearest; 448, e4m3fn's largest finite value, for float8), and read back as q * s. One
scale per (token, kv head) is what jax's Pallas TPU paged attention takes for int8 pages
(`QuantizedTensor`); it follows its token through paging and compaction, so eviction never re-scales.
Scores are always computed on the full-precision prefill keys and values: quantization happens when the
kept slots are paged (`cache.to_pages`) and when a decode token is appended (`cache.append_decode`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# name -> (storage dtype, largest magnitude stored)
_FORMATS = {"int8": (jnp.int8, 127.0), "float8_e4m3fn": (jnp.float8_e4m3fn, 448.0)}
QUANTIZED = tuple(_FORMATS)  # the quantized storages, as the CLIs name them
KV_DTYPES = (None, *QUANTIZED)


def check_kv_dtype(kv_dtype) -> str | None:
    """None (store in the model's dtype) or one of the quantized formats; ValueError otherwise."""
    if kv_dtype is not None and (not isinstance(kv_dtype, str) or kv_dtype not in _FORMATS):
        raise ValueError(f"kv_dtype must be None or one of {', '.join(map(repr, _FORMATS))}, got {kv_dtype!r}")
    return kv_dtype


def check_platform(kv_dtype) -> str | None:
    """`check_kv_dtype`, then on the host: ValueError when the default backend cannot store and read back
    `kv_dtype` (a tiny round trip, once per backend and format), before any model executable compiles."""
    kv_dtype = check_kv_dtype(kv_dtype)
    if kv_dtype is not None and not _round_trips(jax.default_backend(), kv_dtype):
        device = jax.devices()[0].device_kind
        raise ValueError(f"kv_dtype {kv_dtype!r}: this platform ({jax.default_backend()}, {device}) cannot store "
                         f"{kv_dtype} arrays; use " + " or ".join(repr(d) for d in _FORMATS if d != kv_dtype))
    return kv_dtype


@functools.cache
def _round_trips(backend: str, kv_dtype: str) -> bool:
    try:
        x = np.asarray([1.0, -2.0], np.float32)  # exact in every format
        back = jax.jit(lambda a: a.astype(storage_dtype(kv_dtype)).astype(jnp.float32))(x)
        return bool(np.array_equal(np.asarray(back), x))
    except Exception:  # noqa: BLE001 - any failure to lower, compile or run means "not here"
        return False


def storage_dtype(kv_dtype: str):
    return _FORMATS[check_kv_dtype(kv_dtype)][0]


def quantize(x: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (q [..., D] in the storage dtype, scale [...] float32); q * scale ~ x. An all-zero
    vector (an empty slot) gets scale 0 and reads back as zeros."""
    dtype, qmax = _FORMATS[check_kv_dtype(kv_dtype)]
    x = x.astype(jnp.float32)
    scale = jnp.abs(x).max(-1) / qmax
    y = x / jnp.where(scale > 0, scale, 1.0)[..., None]
    if dtype == jnp.int8:
        y = jnp.clip(jnp.round(y), -qmax, qmax)
    return y.astype(dtype), scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """q [..., D], scale [...] -> float32 [..., D]."""
    return q.astype(jnp.float32) * scale[..., None]
