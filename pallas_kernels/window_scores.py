"""Observation-window attention scores without materialising [W, S] (Pallas kernel + jnp reference).

Every post-prefill scorer in vkv_jax asks the same question in a different accent: "how much attention
do a few query rows (the observation window) pay to each prompt key?"

- SnapKV / PyramidKV (arXiv 2404.14469 / 2406.02069): last w queries, softmax over causally visible
  keys, column sums per query head (`per_head`).
- H2O (arXiv 2306.14048): every prompt row, one call per block of rows (W = block).
- VL-Cache (arXiv 2410.23317): post-vision rows; column sums (accumulated post-vision attention) and, per
  row, the number of visible keys with A >= p * rowmax (ThresholdFilter, the paper's Eq. 1-2) -> `count_above`.
- AirCache (arXiv 2503.23956): softmax restricted to visual keys + elite text keys (`key_allowed`),
  rows = elite tokens (others disabled), per-query-head probabilities (`per_head`).
- CSP (arXiv 2412.04652): n-softmax exp(o)/(n + sum exp(o)) (`n_softmax`), and sums split by whether
  the key's modality equals the query's (`q_group`, `key_group` -> `colsum_same` / `colsum_cross`).
The methods (`vkv_jax/methods/`) call `window_scores` with their `impl` option; the few extras that are
cheap per row (VL-Cache's visible-key count, AirCache's head mean) stay in jnp beside the call.

Off the kernel (CPU, GPU, impl="reference") windows of more than ROW_BLOCK rows run the reference in
blocks of ROW_BLOCK rows (`window_scores_row_blocked`, a `lax.scan`): a VL-Cache / AirCache window of
every post-vision row (or every row, when the visual count is unknown) then holds [ROW_BLOCK, S]
logits at a time instead of [W, S] (= [S, S] at worst).

The kernel runs one grid step per (batch row, KV head) and handles the G = Hq / Hkv query heads of the
group together (rows = G * W), so K is read once per KV head and never repeated. Inside a step it makes
two passes over key blocks of `block_k`: pass 1 keeps the online row max m and sum l (flash-attention
style), pass 2 recomputes the logits, forms the probabilities exp(o - m) / l and writes per-key column
sums. Only a [G*W, block_k] tile of scores exists at any time. Everything is float32 inside.
A step holds its KV head's whole K row [S, D] in VMEM (double-buffered by the pipeline): S = 8192,
D = 128 in bf16 is 2 x 2 MiB, inside TPU scoped-VMEM defaults; much longer prompts need a smaller
batch of heads per call or a key-block grid axis. A 128-aligned S (e.g. the cache buffer itself, with
key_valid marking the filled slots) avoids the wrapper's padded copy of K.

Visibility of key slot j for query row w of batch row b:
    key_valid[b, j]  and  j <= q_slot[b, w]  and  key_allowed[b, (w,) j]      (q_slot[b, w] = -1: row off)
Slots (not positions) are compared, so left padding only needs `key_valid = False` on the pad slots.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._dispatch import pick_block, resolve_interpret, round_up, use_kernel
from .mesh import per_device, rows_heads, split_axes

# Generic Pallas (no TPU-only API), but blocks span the whole (padded) S and are not powers of two,
# which the Triton GPU lowering rejects; GPU lowering has never been run. So "auto" compiles the
# kernel on TPU only and uses the XLA reference on GPU (impl="kernel" still tries it there).
KERNEL_BACKENDS = ("tpu",)

_NEG = -1e30  # finite "minus infinity": keeps exp(m_old - m_new) NaN-free on fully masked blocks


class WindowScores(NamedTuple):
    """Outputs of `window_scores`; options that were not asked for are None.

    colsum:       [B, Hkv, S] f32  sum over window rows and the group's query heads of the probabilities
    lse:          [B, Hq, W]  f32  log sum_j exp(logit_j) over visible keys (plain softmax, also when
                                   n_softmax is set); -inf for disabled rows / rows seeing no key
    colsum_heads: [B, Hq, S]  f32  per query head, summed over window rows          (per_head=True)
    count_above:  [B, Hq, W]  i32  #visible keys with A >= p * max_j A              (threshold_p=p)
    colsum_same:  [B, Hkv, S] f32  part of colsum from rows whose group == the key's (q_group, key_group)
    colsum_cross: [B, Hkv, S] f32  part of colsum from rows of another group          (q_group, key_group)
    """

    colsum: jax.Array
    lse: jax.Array
    colsum_heads: jax.Array | None = None
    count_above: jax.Array | None = None
    colsum_same: jax.Array | None = None
    colsum_cross: jax.Array | None = None


def _check(q_win, k, q_slot, key_valid, key_allowed, q_group, key_group, threshold_p, n_softmax):
    B, Hq, W, D = q_win.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, S, D={D}], got {k.shape}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    if q_slot.shape != (B, W):
        raise ValueError(f"q_slot must be [B, W]={(B, W)}, got {q_slot.shape}")
    if key_valid.shape != (B, S):
        raise ValueError(f"key_valid must be [B, S]={(B, S)}, got {key_valid.shape}")
    if key_allowed is not None and key_allowed.shape not in ((B, S), (B, W, S)):
        raise ValueError(f"key_allowed must be [B, S] or [B, W, S], got {key_allowed.shape}")
    if (q_group is None) != (key_group is None):
        raise ValueError("q_group and key_group go together (both or neither)")
    if q_group is not None and (q_group.shape != (B, W) or key_group.shape != (B, S)):
        raise ValueError(f"q_group must be [B, W], key_group [B, S]; got {q_group.shape}, {key_group.shape}")
    if threshold_p is not None and not 0.0 < float(threshold_p) <= 1.0:
        raise ValueError(f"threshold_p={threshold_p} must lie in (0, 1]")
    if n_softmax is not None and not float(n_softmax) > 0.0:
        raise ValueError(f"n_softmax={n_softmax} must be > 0 (n = 1 in CSP)")
    return B, Hq, W, D, Hkv, S


def window_scores_reference(q_win, k, q_slot, key_valid, *, scale=None, key_allowed=None,
                            q_group=None, key_group=None, n_softmax=None, threshold_p=None,
                            per_head=False) -> WindowScores:
    """Plain-jnp definition of `window_scores` (materialises [B, Hq, W, S] in float32)."""
    B, Hq, W, D, Hkv, S = _check(q_win, k, q_slot, key_valid, key_allowed, q_group, key_group,
                                 threshold_p, n_softmax)
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    q = q_win.astype(jnp.float32).reshape(B, Hkv, G, W, D)  # query head h reads kv head h // G
    logits = jnp.einsum("bhgwd,bhsd->bhgws", q, k.astype(jnp.float32)) * scale
    slot = jnp.arange(S, dtype=jnp.int32)
    vis = key_valid.astype(bool)[:, None, :] & (slot[None, None, :] <= q_slot[:, :, None])  # [B,W,S]
    if key_allowed is not None:
        vis = vis & (key_allowed[:, None, :] if key_allowed.ndim == 2 else key_allowed).astype(bool)
    vis = vis[:, None, None]  # [B,1,1,W,S]
    m = jnp.max(jnp.where(vis, logits, -jnp.inf), axis=-1, keepdims=True)
    has = jnp.isfinite(m)
    m = jnp.where(has, m, 0.0)
    e = jnp.where(vis, jnp.exp(logits - m), 0.0)
    l = e.sum(-1, keepdims=True)
    lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
    # CSP n-softmax exp(o)/(n + sum exp(o)), stable form: exp(o - m) / (n exp(-m) + sum exp(o - m)).
    denom = l if n_softmax is None else l + n_softmax * jnp.exp(-m)
    probs = jnp.where(has, e / jnp.where(has, denom, 1.0), 0.0)  # [B,Hkv,G,W,S]
    out = dict(colsum=probs.sum((2, 3)), lse=lse[..., 0].reshape(B, Hq, W))
    if per_head:
        out["colsum_heads"] = probs.sum(3).reshape(B, Hq, S)
    if threshold_p is not None:
        # VL-Cache ThresholdFilter (Eq. 1): keep A[i,j] >= p * max_j' A[i,j'] over visible j.
        a = jnp.where(has, e / jnp.where(has, l, 1.0), 0.0)
        amax = a.max(-1, keepdims=True)
        out["count_above"] = (vis & (a >= threshold_p * amax)).sum(-1).astype(jnp.int32).reshape(B, Hq, W)
    if q_group is not None:
        same = (q_group[:, :, None] == key_group[:, None, :])[:, None, None]  # [B,1,1,W,S]
        out["colsum_same"] = jnp.where(same, probs, 0.0).sum((2, 3))
        out["colsum_cross"] = jnp.where(same, 0.0, probs).sum((2, 3))
    return WindowScores(**out)


ROW_BLOCK = 128  # window rows per step of the row-blocked reference


def window_scores_row_blocked(q_win, k, q_slot, key_valid, *, row_block=None, **kw) -> WindowScores:
    """`window_scores_reference` over blocks of `row_block` window rows (default ROW_BLOCK), summing
    the column sums and concatenating the per-row outputs; never more than [row_block, S] logits per
    query head. Rows padded onto the last block are disabled (q_slot = -1). Same arguments and result."""
    B, Hq, W, D = q_win.shape
    blk = min(ROW_BLOCK if row_block is None else int(row_block), W)
    nb = -(-W // blk)
    pad = nb * blk - W
    allowed, q_group = kw.pop("key_allowed", None), kw.pop("q_group", None)

    def blocks(x, axis, fill=0):  # [.., W, ..] -> [nb, .., blk, ..] along `axis`
        x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)], constant_values=fill)
        x = x.reshape(x.shape[:axis] + (nb, blk) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    xs = dict(q=blocks(q_win, 2), slot=blocks(q_slot.astype(jnp.int32), 1, -1))
    if allowed is not None and allowed.ndim == 3:
        xs["allowed"] = blocks(allowed, 1, False)
    if q_group is not None:
        xs["group"] = blocks(q_group, 1, -1)

    def step(_, x):
        a = x.get("allowed", allowed)
        ws = window_scores_reference(x["q"], k, x["slot"], key_valid, key_allowed=a,
                                     q_group=x.get("group"), **kw)
        return None, ws

    _, ws = lax.scan(step, None, xs)
    rows = lambda r: None if r is None else jnp.moveaxis(r, 0, 2).reshape(B, Hq, nb * blk)[:, :, :W]  # noqa: E731
    total = lambda c: None if c is None else c.sum(0)  # noqa: E731
    return WindowScores(colsum=total(ws.colsum), lse=rows(ws.lse), colsum_heads=total(ws.colsum_heads),
                        count_above=rows(ws.count_above), colsum_same=total(ws.colsum_same),
                        colsum_cross=total(ws.colsum_cross))


def _kernel(*refs, G, W, bk, n_blocks, scale, has_allowed, has_groups, per_head, log_p, n_softmax):
    refs = list(refs)
    q_ref, k_ref, qslot_ref, kmask_ref = refs[:4]
    del refs[:4]
    allowed_ref = refs.pop(0) if has_allowed else None
    qgrp_ref, kgrp_ref = (refs.pop(0), refs.pop(0)) if has_groups else (None, None)
    colsum_ref, lse_ref = refs.pop(0), refs.pop(0)
    heads_ref = refs.pop(0) if per_head else None
    count_ref = refs.pop(0) if log_p is not None else None
    same_ref, cross_ref = (refs.pop(0), refs.pop(0)) if has_groups else (None, None)

    q = q_ref[...].astype(jnp.float32) * scale  # [G*W, D]
    qslot = qslot_ref[...]  # [W, 1]

    def scores(j):
        start = pl.multiple_of(j * bk, bk)
        kb = k_ref[pl.ds(start, bk), :].astype(jnp.float32)  # [bk, D]
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s.reshape(G, W, bk)
        slot = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        vis = (kmask_ref[:, pl.ds(start, bk)] != 0) & (slot <= qslot)  # [W, bk]
        if has_allowed:
            vis = vis & (allowed_ref[:, pl.ds(start, bk)] != 0)
        return start, s, vis[None]  # [G, W, bk], [1, W, bk]

    def pass1(j, carry):  # online row max / sum (the log-sum-exp pass)
        m, l = carry
        _, s, vis = scores(j)
        s = jnp.where(vis, s, _NEG)
        m_new = jnp.maximum(m, s.max(-1, keepdims=True))
        l = l * jnp.exp(m - m_new) + jnp.where(vis, jnp.exp(s - m_new), 0.0).sum(-1, keepdims=True)
        return m_new, l

    m, l = lax.fori_loop(0, n_blocks, pass1, (jnp.full((G, W, 1), _NEG, jnp.float32),
                                              jnp.zeros((G, W, 1), jnp.float32)))
    has = l > 0.0
    lse = m + jnp.log(jnp.where(has, l, 1.0))
    lse_ref[...] = jnp.where(has, lse, -jnp.inf)
    # p = exp(o - m) / denom, not exp(o - lse): lse ~ |o| carries an absolute rounding error of
    # ulp(|o|), which exp turns into a relative error (3e-5 at |o| = 1000); m is an exact logit.
    # CSP n-softmax (stable form): denom = n exp(-m) + sum exp(o - m). If exp(-m)
    # overflows (m < -88), every p is below exp(m) / n, i.e. f32 zero anyway.
    denom = l if n_softmax is None else l + n_softmax * jnp.exp(-m)
    inv = jnp.where(has, 1.0 / jnp.where(has, denom, 1.0), 0.0)
    # A >= p * rowmax(A)  <=>  o >= m + log p  (same softmax denominator on both sides).
    thr = m + (0.0 if log_p is None else log_p)

    if has_groups:
        qgrp = qgrp_ref[...]  # [W, 1]

    def pass2(j, count):
        start, s, vis = scores(j)
        p = jnp.where(vis, jnp.exp(s - m), 0.0) * inv  # [G, W, bk]
        colsum_ref[:, pl.ds(start, bk)] = p.sum(0).sum(0, keepdims=True)
        if per_head:
            heads_ref[:, pl.ds(start, bk)] = p.sum(1)
        if has_groups:
            same = (qgrp == kgrp_ref[:, pl.ds(start, bk)])[None]  # [1, W, bk]
            same_ref[:, pl.ds(start, bk)] = jnp.where(same, p, 0.0).sum(0).sum(0, keepdims=True)
            cross_ref[:, pl.ds(start, bk)] = jnp.where(same, 0.0, p).sum(0).sum(0, keepdims=True)
        if log_p is not None:
            count = count + (vis & (s >= thr)).astype(jnp.int32).sum(-1, keepdims=True)
        return count

    count = lax.fori_loop(0, n_blocks, pass2, jnp.zeros((G, W, 1), jnp.int32))
    if count_ref is not None:
        count_ref[...] = count


def window_scores_kernel(q_win, k, q_slot, key_valid, *, scale=None, key_allowed=None,
                         q_group=None, key_group=None, n_softmax=None, threshold_p=None,
                         per_head=False, block_k=512, interpret=False) -> WindowScores:
    """The Pallas kernel behind `window_scores` (always the kernel; `interpret` passed through)."""
    B, Hq, W, D, Hkv, S = _check(q_win, k, q_slot, key_valid, key_allowed, q_group, key_group,
                                 threshold_p, n_softmax)
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    Wp = round_up(W, 8)  # sublane-aligned rows; pad rows are disabled (q_slot = -1)
    bk = pick_block(S, int(block_k))
    Sp = round_up(S, bk)  # == S for 128-aligned S (e.g. a cache buffer): no padded copy of K
    n_blocks = Sp // bk
    dw, ds = Wp - W, Sp - S

    q = jnp.pad(q_win, ((0, 0), (0, 0), (0, dw), (0, 0))).reshape(B, Hkv, G * Wp, D)
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, ds), (0, 0))) if ds else k
    qslot = jnp.pad(q_slot.astype(jnp.int32), ((0, 0), (0, dw)), constant_values=-1)[:, :, None]
    kmask = key_valid.astype(bool)
    if key_allowed is not None and key_allowed.ndim == 2:
        kmask = kmask & key_allowed.astype(bool)  # a per-row-independent restriction is a key mask
    kmask = jnp.pad(kmask.astype(jnp.int32), ((0, 0), (0, ds)))[:, None, :]

    row = lambda b, h: (b, 0, 0)
    args = [q, kp, qslot, kmask]
    in_specs = [pl.BlockSpec((None, None, G * Wp, D), lambda b, h: (b, h, 0, 0)),
                pl.BlockSpec((None, None, Sp, D), lambda b, h: (b, h, 0, 0)),
                pl.BlockSpec((None, Wp, 1), row),
                pl.BlockSpec((None, 1, Sp), row)]
    has_allowed = key_allowed is not None and key_allowed.ndim == 3
    if has_allowed:
        args.append(jnp.pad(key_allowed.astype(jnp.int32), ((0, 0), (0, dw), (0, ds))))
        in_specs.append(pl.BlockSpec((None, Wp, Sp), row))
    has_groups = q_group is not None
    if has_groups:
        args += [jnp.pad(q_group.astype(jnp.int32), ((0, 0), (0, dw)), constant_values=-1)[:, :, None],
                 jnp.pad(key_group.astype(jnp.int32), ((0, 0), (0, ds)), constant_values=-2)[:, None, :]]
        in_specs += [pl.BlockSpec((None, Wp, 1), row), pl.BlockSpec((None, 1, Sp), row)]

    f32 = jnp.float32
    sum_spec = pl.BlockSpec((None, None, 1, Sp), lambda b, h: (b, h, 0, 0))
    row_spec = pl.BlockSpec((None, None, G, Wp, 1), lambda b, h: (b, h, 0, 0, 0))
    out_shape = [jax.ShapeDtypeStruct((B, Hkv, 1, Sp), f32), jax.ShapeDtypeStruct((B, Hkv, G, Wp, 1), f32)]
    out_specs = [sum_spec, row_spec]
    if per_head:
        out_shape.append(jax.ShapeDtypeStruct((B, Hkv, G, Sp), f32))
        out_specs.append(pl.BlockSpec((None, None, G, Sp), lambda b, h: (b, h, 0, 0)))
    if threshold_p is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, Hkv, G, Wp, 1), jnp.int32))
        out_specs.append(row_spec)
    if has_groups:
        out_shape += [jax.ShapeDtypeStruct((B, Hkv, 1, Sp), f32)] * 2
        out_specs += [sum_spec, sum_spec]

    kernel = functools.partial(
        _kernel, G=G, W=Wp, bk=bk, n_blocks=n_blocks, scale=scale, has_allowed=has_allowed,
        has_groups=has_groups, per_head=per_head,
        log_p=None if threshold_p is None else math.log(threshold_p),
        n_softmax=None if n_softmax is None else float(n_softmax))
    outs = list(pl.pallas_call(kernel, out_shape=out_shape, grid=(B, Hkv), in_specs=in_specs,
                               out_specs=out_specs, interpret=interpret,
                               name="window_scores")(*args))
    rows = lambda x: x[:, :, :, :W, 0].reshape(B, Hq, W)
    res = dict(colsum=outs.pop(0)[:, :, 0, :S], lse=rows(outs.pop(0)))
    if per_head:
        res["colsum_heads"] = outs.pop(0).reshape(B, Hq, Sp)[:, :, :S]
    if threshold_p is not None:
        res["count_above"] = rows(outs.pop(0))
    if has_groups:
        res["colsum_same"] = outs.pop(0)[:, :, 0, :S]
        res["colsum_cross"] = outs.pop(0)[:, :, 0, :S]
    return WindowScores(**res)


def window_scores(q_win, k, q_slot, key_valid, *, scale=None, key_allowed=None, q_group=None,
                  key_group=None, n_softmax=None, threshold_p=None, per_head=False, block_k=512,
                  impl="auto", interpret=None) -> WindowScores:
    """Attention of W window queries over S keys, reduced to per-key scores.

    Args:
      q_win:       [B, Hq, W, D] post-RoPE window queries (any float dtype; computed in f32).
      k:           [B, Hkv, S, D] post-RoPE keys; query head h reads kv head h // (Hq // Hkv).
      q_slot:      [B, W] int32 slot index (along S) of each query, for the causal rule
                   key_slot <= q_slot; -1 disables the row (it contributes nothing anywhere).
      key_valid:   [B, S] bool, False on padding slots.
      scale:       logit scale, default 1 / sqrt(D).
      key_allowed: None, [B, S] or [B, W, S] bool: restrict the softmax to these keys (AirCache's
                   visual ∪ elite keys); lse, probabilities and counts all use the restricted set.
      q_group, key_group: [B, W] / [B, S] int modality tags; give both to get colsum_same/cross (CSP).
      n_softmax:   None for softmax, or n > 0 for CSP's n-softmax exp(o) / (n + sum_j exp(o_j)).
      threshold_p: None, or p in (0, 1] to count keys with A >= p * rowmax (VL-Cache, p = 0.01).
      per_head:    also return colsum per query head [B, Hq, S].
      block_k:     key block of the kernel (a multiple of 128 on TPU); the reference ignores it.
      impl, interpret: see `_dispatch`; off the kernel, more than ROW_BLOCK rows run row-blocked.
    Returns: `WindowScores` (field shapes in its docstring).
    """
    kw = dict(scale=scale, key_allowed=key_allowed, q_group=q_group, key_group=key_group,
              n_softmax=n_softmax, threshold_p=threshold_p, per_head=per_head)
    if use_kernel(impl, KERNEL_BACKENDS):  # per device under a mesh (`mesh.per_device`): rows and heads
        options = dict(scale=scale, n_softmax=n_softmax, threshold_p=threshold_p, per_head=per_head,
                       block_k=block_k, interpret=resolve_interpret(interpret))

        def kernel(q_win, k, q_slot, key_valid, key_allowed, q_group, key_group):
            return window_scores_kernel(q_win, k, q_slot, key_valid, key_allowed=key_allowed, q_group=q_group,
                                        key_group=key_group, **options)

        axes = split_axes(q_win.shape[0], k.shape[1])
        heads, rows = rows_heads(axes), rows_heads(axes[:1])
        return per_device(kernel, axes, (heads, heads) + (rows,) * 5, heads)(
            q_win, k, q_slot, key_valid, key_allowed, q_group, key_group)
    if q_win.shape[2] > ROW_BLOCK:
        _check(q_win, k, q_slot, key_valid, key_allowed, q_group, key_group, threshold_p, n_softmax)
        return window_scores_row_blocked(q_win, k, q_slot, key_valid, **kw)
    return window_scores_reference(q_win, k, q_slot, key_valid, **kw)
