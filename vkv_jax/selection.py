"""Keep-set selection: top-k over scores with protected and forbidden slots, static `k_max`.

TPU Pallas (Mosaic) cannot sort or top-k, so this stays in XLA: `lax.top_k` with a static k_max
on keys where protected slots are +inf and forbidden slots -inf, then ranks >= count are dropped
and the survivors are sorted by slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_INDEX = 0  # value of KeepPlan.indices at ranks >= count (any in-range slot is allowed)


def selection_keys(scores: jax.Array, protected: jax.Array | None, allowed: jax.Array | None) -> jax.Array:
    """float32 [..., S]: +inf on protected & allowed, -inf on not allowed, else the score."""
    key = jnp.asarray(scores, jnp.float32)
    key = jnp.where(jnp.isnan(key), -jnp.finfo(jnp.float32).max, key)
    if protected is not None:
        p = protected if allowed is None else (protected & allowed)
        key = jnp.where(p, jnp.inf, key)
    if allowed is not None:
        key = jnp.where(allowed, key, -jnp.inf)
    return key


def select_topk(scores: jax.Array, count: jax.Array, k_max: int,
                protected: jax.Array | None = None,
                allowed: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Choose, per leading index, up to `count` slots of `S`.

    Args:
      scores:    [..., S] higher = keep (any float dtype; compared in float32).
      count:     [...] int, wanted slots (protected ones included).
      k_max:     static, >= every count that matters; the output width.
      protected: [..., S] bool, always kept (if allowed). If more protected slots exist than
                 `count`, the count grows to hold them all (up to k_max, lower slots first).
      allowed:   [..., S] bool, False slots (padding, dead, other modality) are never kept.
    Returns:
      indices [..., k_max] int32: kept slots ascending in ranks [0, count); PAD_INDEX beyond.
      count   [...] int32: realised count = clip(max(count, #protected), 0, min(k_max, #allowed)).
    Ties between equal scores go to the lower slot.
    """
    S = scores.shape[-1]
    k_max = int(min(k_max, S))
    key = selection_keys(scores, protected, allowed)
    count = jnp.asarray(count, jnp.int32)
    if protected is not None:
        p = protected if allowed is None else (protected & allowed)
        count = jnp.maximum(count, p.sum(-1).astype(jnp.int32))
    n_allowed = S if allowed is None else allowed.sum(-1).astype(jnp.int32)
    count = jnp.clip(count, 0, jnp.minimum(k_max, n_allowed))
    if k_max == 0:
        return jnp.zeros(scores.shape[:-1] + (0,), jnp.int32), count
    _, top = jax.lax.top_k(key, k_max)  # ties -> lower index first
    rank = jnp.arange(k_max, dtype=jnp.int32)
    keep = rank < count[..., None]
    idx = jnp.sort(jnp.where(keep, top.astype(jnp.int32), S), axis=-1)
    return jnp.where(rank < count[..., None], idx, PAD_INDEX).astype(jnp.int32), count


def keep_mask(indices: jax.Array, count: jax.Array, num_slots: int) -> jax.Array:
    """Dense bool [..., S] view of (indices [..., K], count [...])."""
    K = indices.shape[-1]
    live = jnp.arange(K, dtype=jnp.int32) < count[..., None]
    tgt = jnp.where(live, indices, num_slots)  # dead ranks land on a sentinel column
    out = jnp.zeros(indices.shape[:-1] + (num_slots + 1,), bool)
    out = jnp.put_along_axis(out, tgt, True, axis=-1, inplace=False)
    return out[..., :num_slots]
