"""Compaction: gather the kept K/V slots of every (layer, row, kv head) into a smaller cache.

After selection (top-k in XLA, sorted by position), each (l, b, h) keeps `count[l, b, h]` slots listed
in `indices[l, b, h, :count]`. The new cache has a static capacity (the method's largest possible
count + max_new_tokens, see `vkv_jax/cache.py`); slots at and beyond `count` are zero.

Kernel: one grid step per (l, b, h) row. The indices and counts are scalar-prefetched (SMEM on TPU),
so the copy loop reads its source slot as a scalar and moves one [1, D] row at a time inside VMEM:
there is no vector gather (unsupported in Mosaic), and the loop stops at `count`, so dead slots cost
nothing but the zero fill. TPU-only API (`PrefetchScalarGridSpec`): on GPU "auto" uses the reference
(an XLA gather, which is what a GPU kernel would do anyway). All L*B*Hkv*K indices are prefetched at
once and SMEM is small (tens to hundreds of KiB): for big caches call it per layer (inside the
`lax.scan` over layers, or a Python loop), which also keeps each call's VMEM rows small.
pos / tag ([L, B, Hkv, C]) are small: gather them in XLA with `compact_rows_reference` (the same
clip-and-zero rule as here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._dispatch import resolve_interpret, use_kernel
from .mesh import per_device, rows_heads, split_axes

KERNEL_BACKENDS = ("tpu",)


def _check(k, v, indices, count, new_capacity):
    if k.ndim != 5 or v.shape != k.shape:
        raise ValueError(f"k, v must both be [L, B, Hkv, C, D]; got {k.shape}, {v.shape}")
    if indices.ndim != 4 or indices.shape[:3] != k.shape[:3]:
        raise ValueError(f"indices must be [L, B, Hkv, K] matching k {k.shape[:3]}, got {indices.shape}")
    if count.shape != k.shape[:3]:
        raise ValueError(f"count must be [L, B, Hkv]={k.shape[:3]}, got {count.shape}")
    if int(new_capacity) < 1:
        raise ValueError(f"new_capacity={new_capacity} must be >= 1")


def compact_rows_reference(x, indices, count, new_capacity):
    """Gather along axis 3 of x [L, B, Hkv, C, ...] -> [L, B, Hkv, new_capacity, ...], zero past count.

    indices [L, B, Hkv, K] are clipped into [0, C - 1]; entries >= min(K, new_capacity) are ignored.
    """
    C = x.shape[3]
    n = min(indices.shape[3], int(new_capacity))
    idx = jnp.clip(indices[..., :n].astype(jnp.int32), 0, C - 1)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 4))
    g = jnp.take_along_axis(x, idx, axis=3)
    keep = jnp.arange(n, dtype=jnp.int32) < count[..., None]
    g = jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 4)), g, jnp.zeros((), x.dtype))
    pad = [(0, 0)] * x.ndim
    pad[3] = (0, int(new_capacity) - n)
    return jnp.pad(g, pad)


def compact_kv_reference(k, v, indices, count, new_capacity):
    """jnp definition of `compact_kv` (`take_along_axis`)."""
    _check(k, v, indices, count, new_capacity)
    return (compact_rows_reference(k, indices, count, new_capacity),
            compact_rows_reference(v, indices, count, new_capacity))


def _kernel(idx_ref, cnt_ref, k_ref, v_ref, ko_ref, vo_ref, *, B, H, K):
    l, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = (l * B + b) * H + h
    ko_ref[...] = jnp.zeros(ko_ref.shape, ko_ref.dtype)
    vo_ref[...] = jnp.zeros(vo_ref.shape, vo_ref.dtype)

    def copy(i, carry):
        src = idx_ref[r * K + i]
        ko_ref[pl.ds(i, 1), :] = k_ref[pl.ds(src, 1), :]
        vo_ref[pl.ds(i, 1), :] = v_ref[pl.ds(src, 1), :]
        return carry

    lax.fori_loop(0, cnt_ref[r], copy, 0)


def compact_kv_kernel(k, v, indices, count, new_capacity, *, interpret=False):
    """The Pallas kernel behind `compact_kv`."""
    _check(k, v, indices, count, new_capacity)
    L, B, H, C, D = k.shape
    Cn = int(new_capacity)
    n = min(indices.shape[3], Cn)
    # Clip in XLA so the kernel never reads out of bounds (same rule as the reference).
    idx = jnp.clip(indices[..., :n].astype(jnp.int32), 0, C - 1).reshape(-1)
    cnt = jnp.clip(count.astype(jnp.int32), 0, n).reshape(-1)
    row_in = pl.BlockSpec((None, None, None, C, D), lambda l, b, h, *_: (l, b, h, 0, 0))
    row_out = pl.BlockSpec((None, None, None, Cn, D), lambda l, b, h, *_: (l, b, h, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(L, B, H), in_specs=[row_in, row_in], out_specs=[row_out, row_out])
    out_shape = [jax.ShapeDtypeStruct((L, B, H, Cn, D), k.dtype),
                 jax.ShapeDtypeStruct((L, B, H, Cn, D), v.dtype)]
    ko, vo = pl.pallas_call(functools.partial(_kernel, B=B, H=H, K=n), out_shape=out_shape,
                            grid_spec=grid_spec, interpret=interpret, name="compact_kv")(idx, cnt, k, v)
    return ko, vo


def compact_kv(k, v, indices, count, new_capacity, *, impl="auto", interpret=None):
    """Gather kept K/V slots into a new cache of static capacity.

    Args:
      k, v:         [L, B, Hkv, C, D] cache buffers.
      indices:      [L, B, Hkv, K] int32 source slots to keep, in the order to store them (sorted by
                    position for the methods); clipped into [0, C - 1]; only the first
                    min(K, new_capacity) are used.
      count:        [L, B, Hkv] int32 number of kept slots per row (entries of indices past it ignored).
      new_capacity: static int, the new C.
    Returns: (k_new, v_new), each [L, B, Hkv, new_capacity, D], slot i = k[..., indices[..., i], :]
      for i < count, zero for i >= count.
    """
    if use_kernel(impl, KERNEL_BACKENDS):  # per device under a mesh (`mesh.per_device`)
        kernel = functools.partial(compact_kv_kernel, new_capacity=new_capacity,
                                   interpret=resolve_interpret(interpret))
        axes = split_axes(k.shape[1], k.shape[2])
        spec = rows_heads(axes, lead=1)
        return per_device(kernel, axes, (spec,) * 4, spec)(k, v, indices, count)
    return compact_kv_reference(k, v, indices, count, new_capacity)
