"""Decode attention: one query token per row over a compacted cache whose live length differs per
(row, kv head) (Pallas kernel + jnp reference).

After compaction every (layer, row, kv head) holds its own number of live slots inside one static
capacity C. A dense attention would read all C slots; this kernel reads only blocks that contain live
slots:
- grid (B, Hkv, C / block_c); the live extent (last live slot + 1) of each (b, h) is scalar-prefetched;
- the K/V block index is clamped to the last live block, so the pipeline re-uses the block already in
  VMEM instead of fetching dead blocks from HBM, and `pl.when` skips their compute;
- online softmax across blocks (running max m, sum l, accumulator in VMEM scratch), float32 inside;
- GQA: the G = Hq / Hkv query heads of a KV head are the G rows of one [G, D] query tile, so each K/V
  block is read once per KV head, never repeated per query head.
A slot is live iff slot < length and pos >= 0 (vkv_jax/cache.py: left-padding slots keep pos = -1).
Uses `PrefetchScalarGridSpec` and VMEM scratch (TPU API): on GPU "auto" uses the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._dispatch import pick_block, resolve_interpret, round_up, use_kernel
from .mesh import per_device, rows_heads, split_axes

KERNEL_BACKENDS = ("tpu",)

_NEG = -1e30  # finite "minus infinity": exp(m_old - m_new) stays NaN-free on fully masked blocks


def live_mask(length, pos):
    """[B, Hkv, C] bool from length [B, Hkv] and pos [B, Hkv, C]: slot < length and pos >= 0."""
    slot = jnp.arange(pos.shape[-1], dtype=jnp.int32)
    return (slot < length[..., None]) & (pos >= 0)


def _prepare(q, k, v, live):
    if isinstance(live, (tuple, list)):
        live = live_mask(*live)
    B, Hq, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k, v must be [B={B}, Hkv, C, D={D}], got {k.shape}, {v.shape}")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {k.shape[1]}")
    if live.shape != k.shape[:3]:
        raise ValueError(f"live must be [B, Hkv, C]={k.shape[:3]}, got {live.shape}")
    return live.astype(bool)


def decode_attention_reference(q, k, v, live, *, scale=None, return_lse=False):
    """Masked softmax attention in float32 (same signature as `decode_attention`)."""
    live = _prepare(q, k, v, live)
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(B, Hkv, Hq // Hkv, D)
    s = jnp.einsum("bhgd,bhcd->bhgc", qg, k.astype(jnp.float32)) * scale
    mask = live[:, :, None, :]
    m = jnp.max(jnp.where(mask, s, -jnp.inf), -1, keepdims=True)
    has = jnp.isfinite(m)
    m = jnp.where(has, m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhgc,bhcd->bhgd", p, v.astype(jnp.float32)) / jnp.where(has, l, 1.0)
    o = jnp.where(has, o, 0.0).reshape(B, Hq, D).astype(q.dtype)
    if return_lse:
        lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf).reshape(B, Hq)
        return o, lse
    return o


def _kernel(ext_ref, q_ref, k_ref, v_ref, live_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
            scale, bc, H, n_blocks):
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(c * bc < ext_ref[b * H + h])  # blocks past the live extent: no compute (and no DMA)
    def _block():
        q = q_ref[...].astype(jnp.float32) * scale  # [G, D]
        kb = k_ref[...].astype(jnp.float32)  # [bc, D]
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        live = live_ref[...] != 0  # [1, bc]
        s = jnp.where(live, s, _NEG)
        m_old = m_sc[...]
        m_new = jnp.maximum(m_old, s.max(-1, keepdims=True))
        corr = jnp.exp(m_old - m_new)
        p = jnp.where(live, jnp.exp(s - m_new), 0.0)  # [G, bc]
        l_sc[...] = corr * l_sc[...] + p.sum(-1, keepdims=True)
        acc_sc[...] = corr * acc_sc[...] + jnp.dot(p, v_ref[...].astype(jnp.float32),
                                                   preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(c == n_blocks - 1)
    def _finish():
        l = l_sc[...]
        has = l > 0.0
        o_ref[...] = jnp.where(has, acc_sc[...] / jnp.where(has, l, 1.0), 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has, m_sc[...] + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)


def decode_attention_kernel(q, k, v, live, *, scale=None, return_lse=False, block_c=512,
                            interpret=False):
    """The Pallas kernel behind `decode_attention`."""
    live = _prepare(q, k, v, live)
    B, Hq, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    bc = pick_block(C, int(block_c))
    Cp = round_up(C, bc)  # == C for cache capacities (multiples of 128): no padded copy of K/V
    n_blocks = Cp // bc
    pad = ((0, 0), (0, 0), (0, Cp - C))
    live_i = jnp.pad(live.astype(jnp.int32), pad)
    # Live extent = last live slot + 1 (0 when nothing is live): the blocks worth reading.
    slot = jnp.arange(Cp, dtype=jnp.int32)
    ext = jnp.max(jnp.where(live_i != 0, slot + 1, 0), axis=-1).reshape(-1)
    kp = jnp.pad(k, pad + ((0, 0),)) if Cp != C else k
    vp = jnp.pad(v, pad + ((0, 0),)) if Cp != C else v

    def live_block(b, h, c, ext_ref):  # clamp to the last live block: dead blocks are not fetched
        last = jnp.maximum(pl.cdiv(ext_ref[b * Hkv + h], bc) - 1, 0)
        return b, h, 0, jnp.minimum(c, last)

    def kv_block(b, h, c, ext_ref):
        b, h, _, c = live_block(b, h, c, ext_ref)
        return b, h, c, 0

    in_specs = [pl.BlockSpec((None, None, G, D), lambda b, h, c, e: (b, h, 0, 0)),
                pl.BlockSpec((None, None, bc, D), kv_block),
                pl.BlockSpec((None, None, bc, D), kv_block),
                pl.BlockSpec((None, None, 1, bc), live_block)]
    out_specs = [pl.BlockSpec((None, None, G, D), lambda b, h, c, e: (b, h, 0, 0)),
                 pl.BlockSpec((None, None, G, 1), lambda b, h, c, e: (b, h, 0, 0))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(B, Hkv, n_blocks), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((G, 1), jnp.float32), pltpu.VMEM((G, 1), jnp.float32),
                        pltpu.VMEM((G, D), jnp.float32)])
    out_shape = [jax.ShapeDtypeStruct((B, Hkv, G, D), q.dtype),
                 jax.ShapeDtypeStruct((B, Hkv, G, 1), jnp.float32)]
    kernel = functools.partial(_kernel, scale=scale, bc=bc, H=Hkv, n_blocks=n_blocks)
    o, lse = pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=interpret,
                            name="decode_attention")(ext, q.reshape(B, Hkv, G, D), kp, vp,
                                                     live_i[:, :, None, :])
    o = o.reshape(B, Hq, D)
    return (o, lse.reshape(B, Hq)) if return_lse else o


def decode_attention(q, k, v, live, *, scale=None, return_lse=False, block_c=512, impl="auto",
                     interpret=None):
    """Attention of one query token per (row, query head) over a per-head-ragged cache.

    Args:
      q:      [B, Hq, D] the new token's post-RoPE queries.
      k, v:   [B, Hkv, C, D] one layer's cache; query head h reads kv head h // (Hq // Hkv).
      live:   [B, Hkv, C] bool, or a tuple (length [B, Hkv] int32, pos [B, Hkv, C] int32) meaning
              slot < length and pos >= 0.
      scale:  logit scale, default 1 / sqrt(D).
      return_lse: also return lse [B, Hq] f32 = log sum exp(logits) over live slots (-inf if none),
              for merging with attention over another segment by log-sum-exp.
      block_c: cache block of the kernel (a multiple of 128 on TPU); the reference ignores it.
      impl, interpret: see `_dispatch`.
    Returns: out [B, Hq, D] in q's dtype (zeros for a head with no live slot), or (out, lse).
    """
    if use_kernel(impl, KERNEL_BACKENDS):  # per device under a mesh (`mesh.per_device`)
        kernel = functools.partial(decode_attention_kernel, scale=scale, return_lse=return_lse, block_c=block_c,
                                   interpret=resolve_interpret(interpret))
        axes = split_axes(q.shape[0], k.shape[1])
        spec = rows_heads(axes)
        return per_device(kernel, axes, (spec,) * 4, spec)(q, k, v, live)
    return decode_attention_reference(q, k, v, live, scale=scale, return_lse=return_lse)
