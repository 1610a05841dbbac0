"""Decode attention over a paged KV pool: one query token per row over the pages its page table lists
(Pallas kernel + jnp reference + a packed path for CPU), and the log-sum-exp merge of two segments.

The pool `k_pages, v_pages [P, ps, D]` holds every (layer, row, kv head)'s kept prompt slots in whole
pages (vkv_jax/cache.py). One layer's view is its page table `[B, Hkv, M]` (pool page of each owner's
i-th page) and lengths `[B, Hkv]` (slots [0, length) of the owner's pages are live, in order).

- `paged_attention_reference`: gathers each owner's M pages and runs masked softmax (reads M pages per
  owner whatever the length: the definition, not a fast path).
- `paged_attention_kernel` (TPU API, interpret mode elsewhere): grid (B, Hkv, M); the page table and
  lengths are scalar-prefetched, the K/V block of grid step i is page `table[b, h, min(i, last)]`, so
  pages past an owner's length are never fetched (the pipeline re-uses the block in VMEM) and `pl.when`
  skips their compute; online softmax in VMEM scratch; the G = Hq / Hkv query heads of a kv head are one
  [G, D] tile. A row reads only pages its own table names.
- `packed_attention`: the CPU path. One layer's pages are a contiguous range of the pool; a
  `lax.while_loop` walks it in chunks of pages, each page scored against its owner's queries, and
  segment max / sums by owner give an online softmax per (row, kv head). Cost grows with the layer's
  live pages, not with the prompt length or M. Pages of other owners never mix: every reduction is a
  segment reduction keyed by the page's owner (no one-hot matmul that could spread a NaN).
- `merge_by_lse`: attention over two disjoint segments from each one's (out, lse).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._dispatch import resolve_interpret, use_kernel
from .decode_attention import decode_attention_reference

KERNEL_BACKENDS = ("tpu",)

_NEG = -1e30


def _check(q, k_pages, v_pages, page_table, lengths):
    B, Hq, D = q.shape
    if k_pages.ndim != 3 or v_pages.shape != k_pages.shape or k_pages.shape[2] != D:
        raise ValueError(f"k_pages, v_pages must be [P, ps, D={D}], got {k_pages.shape}, {v_pages.shape}")
    if page_table.ndim != 3 or page_table.shape[0] != B or Hq % page_table.shape[1]:
        raise ValueError(f"page_table must be [B={B}, Hkv, M] with Hkv dividing {Hq}, got {page_table.shape}")
    if lengths.shape != page_table.shape[:2]:
        raise ValueError(f"lengths must be [B, Hkv]={page_table.shape[:2]}, got {lengths.shape}")


def _dequantize(pages, scales):
    """Quantized pages [..., ps, D] and their per-slot scales [..., ps] -> float32; unquantized as they are."""
    return pages if scales is None else pages.astype(jnp.float32) * scales[..., None]


def paged_attention_reference(q, k_pages, v_pages, page_table, lengths, *, scale=None, return_lse=False,
                              k_scale=None, v_scale=None):
    """Masked softmax over each owner's gathered pages (same signature as `paged_attention`)."""
    _check(q, k_pages, v_pages, page_table, lengths)
    B, H, M = page_table.shape
    ps = k_pages.shape[1]
    k = _dequantize(k_pages[page_table], None if k_scale is None else k_scale[page_table]).reshape(B, H, M * ps, -1)
    v = _dequantize(v_pages[page_table], None if v_scale is None else v_scale[page_table]).reshape(B, H, M * ps, -1)
    live = jnp.arange(M * ps, dtype=jnp.int32) < lengths[..., None]
    return decode_attention_reference(q, k, v, live, scale=scale, return_lse=return_lse)


def _kernel(table_ref, len_ref, q_ref, k_ref, v_ref, *refs, scale, ps, H, M, quantized):
    if quantized:  # the page's per-slot scales come in beside it
        ks_ref, vs_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = len_ref[b * H + h]

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(i * ps < n)  # pages past the owner's length: no compute (and, by the index map, no DMA)
    def _page():
        q = q_ref[...].astype(jnp.float32) * scale  # [G, D]
        kb = k_ref[...].astype(jnp.float32)  # [ps, D]
        vb = v_ref[...].astype(jnp.float32)
        if quantized:
            kb = kb * ks_ref[...].reshape(ps, 1)
            vb = vb * vs_ref[...].reshape(ps, 1)
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        live = (i * ps + lax.broadcasted_iota(jnp.int32, s.shape, 1)) < n
        s = jnp.where(live, s, _NEG)
        m_old = m_sc[...]
        m_new = jnp.maximum(m_old, s.max(-1, keepdims=True))
        corr = jnp.exp(m_old - m_new)
        p = jnp.where(live, jnp.exp(s - m_new), 0.0)
        l_sc[...] = corr * l_sc[...] + p.sum(-1, keepdims=True)
        acc_sc[...] = corr * acc_sc[...] + jnp.dot(p, vb, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(i == M - 1)
    def _finish():
        l = l_sc[...]
        has = l > 0.0
        o_ref[...] = jnp.where(has, acc_sc[...] / jnp.where(has, l, 1.0), 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has, m_sc[...] + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)


def paged_attention_kernel(q, k_pages, v_pages, page_table, lengths, *, scale=None, return_lse=False,
                           interpret=False, k_scale=None, v_scale=None):
    """The Pallas kernel behind `paged_attention` (one grid step per (row, kv head, page))."""
    _check(q, k_pages, v_pages, page_table, lengths)
    B, Hq, D = q.shape
    _, H, M = page_table.shape
    P, ps, _ = k_pages.shape
    G = Hq // H
    scale = D ** -0.5 if scale is None else float(scale)
    table = jnp.clip(page_table.astype(jnp.int32), 0, P - 1).reshape(-1)
    n = lengths.astype(jnp.int32).reshape(-1)

    def page_block(b, h, i, table_ref, len_ref):  # clamp to the owner's last live page: dead pages are not fetched
        last = jnp.maximum(pl.cdiv(len_ref[b * H + h], ps) - 1, 0)
        return table_ref[(b * H + h) * M + jnp.minimum(i, last)], 0, 0

    head = lambda b, h, i, t, n: (b, h, 0, 0)  # noqa: E731
    quantized = k_scale is not None
    in_specs = [pl.BlockSpec((None, None, G, D), head),
                pl.BlockSpec((None, ps, D), page_block),
                pl.BlockSpec((None, ps, D), page_block)]
    operands = [q.reshape(B, H, G, D), k_pages, v_pages]
    if quantized:  # scales [P, 1, ps]: one page's scales are a lane-major row
        in_specs += [pl.BlockSpec((None, 1, ps), page_block)] * 2
        operands += [k_scale.astype(jnp.float32).reshape(P, 1, ps), v_scale.astype(jnp.float32).reshape(P, 1, ps)]
    out_specs = [pl.BlockSpec((None, None, G, D), head), pl.BlockSpec((None, None, G, 1), head)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, H, M), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((G, 1), jnp.float32), pltpu.VMEM((G, 1), jnp.float32),
                        pltpu.VMEM((G, D), jnp.float32)])
    out_shape = [jax.ShapeDtypeStruct((B, H, G, D), q.dtype), jax.ShapeDtypeStruct((B, H, G, 1), jnp.float32)]
    kernel = functools.partial(_kernel, scale=scale, ps=ps, H=H, M=M, quantized=quantized)
    o, lse = pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=interpret,
                            name="paged_attention")(table, n, *operands)
    o = o.reshape(B, Hq, D)
    return (o, lse.reshape(B, Hq)) if return_lse else o


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, scale=None, return_lse=False, impl="auto",
                    interpret=None, k_scale=None, v_scale=None):
    """Attention of one query token per (row, query head) over the pages each (row, kv head) owns.

    Args:
      q:        [B, Hq, D] post-RoPE queries; query head h reads kv head h // (Hq // Hkv).
      k_pages, v_pages: [P, ps, D] the pool.
      page_table: [B, Hkv, M] int32 pool page of each owner's i-th page (entries past its length unread).
      lengths:  [B, Hkv] int32 live slots of each owner: slots [0, length) of its pages in table order.
      return_lse: also return lse [B, Hq] f32 (-inf for an owner with no live slot), for `merge_by_lse`.
      k_scale, v_scale: [P, ps] float32 per-slot scales of quantized pages (int8 / float8, `vkv_jax.kv_quant`):
        slot j of page p reads back as k_pages[p, j] * k_scale[p, j]; None for unquantized pages.
      impl, interpret: see `_dispatch` ("auto": the kernel on TPU, the reference elsewhere).
    Returns: out [B, Hq, D] in q's dtype (zeros where nothing is live), or (out, lse).
    """
    if use_kernel(impl, KERNEL_BACKENDS):
        return paged_attention_kernel(q, k_pages, v_pages, page_table, lengths, scale=scale,
                                      return_lse=return_lse, interpret=resolve_interpret(interpret),
                                      k_scale=k_scale, v_scale=v_scale)
    return paged_attention_reference(q, k_pages, v_pages, page_table, lengths, scale=scale,
                                     return_lse=return_lse, k_scale=k_scale, v_scale=v_scale)


def packed_attention(q, k_pages, v_pages, page_pos, page_owner, first_page, stop_page, owner_offset, *,
                     num_kv_heads: int, scale=None, chunk_pages=None, k_scale=None, v_scale=None):
    """One layer's attention by walking its contiguous page range [first_page, stop_page) of the pool.

    Args:
      q: [B, Hq, D]; k_pages, v_pages [P, ps, D]; page_pos [P, ps] int32 (>= 0: the slot holds a kept token);
      page_owner [P] int32 global owner id (the layer's owners are owner_offset + b * Hkv + h);
      first_page, stop_page, owner_offset: int32 scalars (traced); num_kv_heads: static Hkv.
      k_scale, v_scale: [P, ps] per-slot scales of quantized pages (as in `paged_attention`), or None.
      chunk_pages: static pages per loop step (default: about 4096 slots; on the 2-core CPU, 2048-4096
        slots a step decoded a 2904-token batch of 4 ~15% faster than 1024 and ~25% faster than 256).
    Returns (out [B, Hq, D] in q's dtype, lse [B, Hq] f32), like `paged_attention(..., return_lse=True)`.
    """
    B, Hq, D = q.shape
    P, ps, _ = k_pages.shape
    H = int(num_kv_heads)
    G = Hq // H
    BH = B * H
    scale = D ** -0.5 if scale is None else scale
    c = int(chunk_pages or max(1, min(P, 4096 // ps)))
    qg = q.astype(jnp.float32).reshape(BH, G, D) * scale
    first = jnp.asarray(first_page, jnp.int32)
    stop = jnp.asarray(stop_page, jnp.int32)
    n_chunks = (stop - first + c - 1) // c

    def body(carry):
        i, m, l, acc = carry
        lo = first + i * c
        base = jnp.clip(lo, 0, P - c)  # dynamic_slice clamps: keep the pages it really returns
        pid = base + jnp.arange(c, dtype=jnp.int32)
        kp = _dequantize(lax.dynamic_slice_in_dim(k_pages, base, c),  # [c, ps, D]
                         None if k_scale is None else lax.dynamic_slice_in_dim(k_scale, base, c)).astype(jnp.float32)
        vp = _dequantize(lax.dynamic_slice_in_dim(v_pages, base, c),
                         None if v_scale is None else lax.dynamic_slice_in_dim(v_scale, base, c)).astype(jnp.float32)
        live = lax.dynamic_slice_in_dim(page_pos, base, c) >= 0
        own = lax.dynamic_slice_in_dim(page_owner, base, c) - owner_offset
        ok = (pid >= lo) & (pid < jnp.minimum(stop, lo + c)) & (own >= 0) & (own < BH)
        seg = jnp.where(ok, own, BH)  # BH: a dump segment, dropped
        live = live & ok[:, None]  # [c, ps]
        s = jnp.einsum("cgd,csd->cgs", qg[jnp.minimum(seg, BH - 1)], kp)
        s = jnp.where(live[:, None, :], s, -jnp.inf)
        m_chunk = jax.ops.segment_max(s.max(-1), seg, BH + 1, indices_are_sorted=True)[:BH]  # [BH, G]
        m_new = jnp.maximum(m, m_chunk)
        m_page = jnp.concatenate([m_new, jnp.zeros((1, G), jnp.float32)])[seg]  # [c, G]
        p = jnp.where(live[:, None, :], jnp.exp(s - jnp.where(jnp.isfinite(m_page), m_page, 0.0)[..., None]), 0.0)
        vp = jnp.where(live[..., None], vp, 0.0)
        l_chunk = jax.ops.segment_sum(p.sum(-1), seg, BH + 1, indices_are_sorted=True)[:BH]
        a_chunk = jax.ops.segment_sum(jnp.einsum("cgs,csd->cgd", p, vp), seg, BH + 1, indices_are_sorted=True)[:BH]
        corr = jnp.where(jnp.isfinite(m), jnp.exp(m - jnp.where(jnp.isfinite(m_new), m_new, 0.0)), 0.0)
        return i + 1, m_new, corr * l + l_chunk, corr[..., None] * acc + a_chunk

    init = (jnp.int32(0), jnp.full((BH, G), -jnp.inf, jnp.float32), jnp.zeros((BH, G), jnp.float32),
            jnp.zeros((BH, G, D), jnp.float32))
    _, m, l, acc = lax.while_loop(lambda carry: carry[0] < n_chunks, body, init)
    has = l > 0
    o = jnp.where(has[..., None], acc / jnp.where(has, l, 1.0)[..., None], 0.0)
    lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
    return o.reshape(B, Hq, D).astype(q.dtype), lse.reshape(B, Hq)


def merge_by_lse(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from each set's (out [B, Hq, D], lse [B, Hq])."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    wa = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - m), 0.0)[..., None]
    wb = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - m), 0.0)[..., None]
    den = wa + wb
    out = (wa * out_a.astype(jnp.float32) + wb * out_b.astype(jnp.float32)) / jnp.where(den > 0, den, 1.0)
    return out.astype(out_a.dtype)
