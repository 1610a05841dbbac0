"""Pure scoring math shared by the methods (the hot spots the Pallas kernels will replace).

All functions take post-RoPE q [B, Hq, W, D] (W query rows) and k [B, Hkv, S, D], compute in float32
with logits scaled by 1/sqrt(D), and treat GQA by grouping query head h onto kv head h // G
(contiguous groups, HF `repeat_kv`). Masks are traced booleans, so left-padded batches work:
a masked entry has probability exactly 0 and a fully masked row contributes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_slots(S: int, W: int) -> jax.Array:
    """int32 [W]: slot indices of the last W rows of a length-S (left-padded) prompt."""
    return jnp.arange(S - W, S, dtype=jnp.int32)


def causal_mask(q_slots: jax.Array, valid: jax.Array, S: int) -> jax.Array:
    """bool [B, W, S]: key slot j visible from query slot i (j <= i, both real tokens)."""
    j = jnp.arange(S, dtype=jnp.int32)
    vis = j[None, :] <= q_slots[:, None]  # [W, S]
    qv = valid[:, q_slots]  # [B, W]
    return vis[None] & valid[:, None, :] & qv[:, :, None]


def gqa_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """float32 [B, Hkv, G, W, S] logits q.k / sqrt(D)."""
    B, Hq, W, D = q.shape
    Hkv = k.shape[1]
    qg = q.astype(jnp.float32).reshape(B, Hkv, Hq // Hkv, W, D)
    return jnp.einsum("bkgwd,bksd->bkgws", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(D))


def masked_softmax(logits: jax.Array, mask: jax.Array, n: float = 0.0) -> jax.Array:
    """Softmax over the last axis restricted to `mask` (n > 0: n-softmax exp(x)/(n + sum exp(x))).

    Masked entries are exactly 0; a fully masked row is all 0. Stable form for n-softmax:
    exp(x - m) / (n exp(-m) + sum exp(x - m)), m = row max.
    """
    x = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
    m = x.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask, jnp.exp(x - m), 0.0)
    denom = e.sum(-1, keepdims=True)
    if n:
        denom = denom + n * jnp.exp(-m)
    return e / jnp.where(denom > 0, denom, 1.0)


def nsoftmax(x: jax.Array, n: float = 1.0, axis: int = -1) -> jax.Array:
    """exp(x_i) / (n + sum_j exp(x_j)) in the stable form (n = 0 is softmax)."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
    return jnp.moveaxis(masked_softmax(x, jnp.ones(x.shape, bool), n), -1, axis)


def window_probs(q_win: jax.Array, k: jax.Array, mask: jax.Array, n: float = 0.0) -> jax.Array:
    """float32 [B, Hkv, G, W, S] attention probabilities of the window rows (mask [B, W, S])."""
    return masked_softmax(gqa_logits(q_win, k), mask[:, None, None], n)


def window_softmax_colsum(q_win: jax.Array, k: jax.Array, mask: jax.Array, n: float = 0.0,
                          row_weight: jax.Array | None = None, per_query_head: bool = False) -> jax.Array:
    """Attention received by each key, summed over window rows (and over each GQA group).

    q_win [B, Hq, W, D]; k [B, Hkv, S, D]; mask [B, W, S]; row_weight [B, W] optional.
    Returns float32 [B, Hkv, S] (or [B, Hq, S] with per_query_head).
    """
    p = window_probs(q_win, k, mask, n)
    if row_weight is not None:
        p = p * row_weight[:, None, None, :, None]
    s = p.sum(-2)  # [B, Hkv, G, S]
    if per_query_head:
        return s.reshape(s.shape[0], -1, s.shape[-1])
    return s.sum(2)


def full_softmax_colsum(q: jax.Array, k: jax.Array, valid: jax.Array, block: int = 256) -> jax.Array:
    """H2O accumulated attention: sum over all prompt query rows of causal softmax, per kv head.

    q [B, Hq, S, D]; k [B, Hkv, S, D]; valid [B, S]. Query rows are processed in blocks of `block`
    (lax.scan), so the [S, S] matrix is never materialised. Returns float32 [B, Hkv, S].
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    blk = min(block, S)
    nb = -(-S // blk)
    pad = nb * blk - S
    qp = jnp.pad(q, ((0, 0), (0, 0), (pad, 0), (0, 0)))  # pad at the front: rows stay right-aligned
    vq = jnp.pad(valid, ((0, 0), (pad, 0)))
    qb = qp.reshape(B, Hq, nb, blk, D).transpose(2, 0, 1, 3, 4)  # [nb, B, Hq, blk, D]
    vb = vq.reshape(B, nb, blk).transpose(1, 0, 2)  # [nb, B, blk]
    slots = (jnp.arange(nb * blk, dtype=jnp.int32) - pad).reshape(nb, blk)

    def step(acc, xs):
        qi, vi, si = xs
        j = jnp.arange(S, dtype=jnp.int32)
        mask = (j[None, :] <= si[:, None])[None] & valid[:, None, :] & vi[:, :, None]
        return acc + window_softmax_colsum(qi, k, mask), None

    acc, _ = jax.lax.scan(step, jnp.zeros((B, Hkv, S), jnp.float32), (qb, vb, slots))
    return acc


def pool1d(scores: jax.Array, kernel: int, mode: str = "max") -> jax.Array:
    """1-D pooling over the last axis, stride 1, padding kernel // 2 (torch semantics).

    avg: zero padding, divide by `kernel` (count_include_pad=True); max: -inf padding. Our scores
    are >= 0 and exactly 0 on padding, so left-padded rows pool exactly like unpadded ones.
    """
    if kernel <= 1:
        return scores
    pad = kernel // 2
    if mode == "avg":
        x = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(pad, pad)])
        out = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1,) * (scores.ndim - 1) + (kernel,),
                                    (1,) * scores.ndim, "VALID")
        return out[..., :scores.shape[-1]] / kernel
    if mode == "max":
        x = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(pad, pad)], constant_values=-jnp.inf)
        out = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) * (scores.ndim - 1) + (kernel,),
                                    (1,) * scores.ndim, "VALID")
        return out[..., :scores.shape[-1]]
    raise ValueError(f"pooling must be 'max' or 'avg', got {mode!r}")


def last_visual_end(ctx_is_visual: jax.Array) -> jax.Array:
    """int32 [B]: slot after the last visual token (v_end), 0 if the row has none."""
    S = ctx_is_visual.shape[-1]
    j = jnp.arange(1, S + 1, dtype=jnp.int32)
    return jnp.where(ctx_is_visual, j, 0).max(-1)
