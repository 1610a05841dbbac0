"""Decode-phase compression: a decode segment of fixed size whose least-attended slots are evicted while
the answer is generated, so the KV of a long answer stays bounded.

`DecodeTrim(budget=N, interval=K, window=W)` on a request makes its decode segment a ring of N slots per
(layer, row, kv head): the live KV never exceeds the kept prompt slots + N. Every decode step adds each
decode slot's share of the step's attention (over prompt pages and decode slots, summed over the query
heads of its kv head) to that slot's score, H2O-style (`accumulate`). When the segment is full, a step
first trims it (`trim_if_full`): the newest W slots stay, and of the older ones the N - K - W with the
highest scores (ties to the older slot); the freed K slots take the next K tokens, so a trim runs every
K steps. The prompt's kept slots are never evicted (their budget was the prefill method's).

Everything has fixed shapes: the trim is a `lax.cond` inside the step, so the scan, the bucketed while
loop and the streaming loop run it without a new executable, and the page pool never grows.
Accumulated scores rather than a SnapKV-like window of recent queries because they are kept incrementally
(one [L, B, Hkv, N] array, no query history) and the protected window already keeps what recent queries
would score highest; the two were not measured against each other (no model here gives long answers that
can be scored yet).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from vkv_jax.selection import select_topk


@dataclasses.dataclass(frozen=True)
class DecodeTrim:
    """budget N: decode slots per (layer, row, kv head), the segment's fixed size; interval K: slots each
    trim frees (a trim every K steps once full); window W: newest slots never evicted. 1 <= K, W >= 1,
    K + W <= N."""

    budget: int
    interval: int = 0  # 0: N // 4 (at least 1)
    window: int = 0  # 0: min(16, N // 4) (at least 1)

    def __post_init__(self):
        for name in ("budget", "interval", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"DecodeTrim.{name} must be an integer, got {type(value).__name__} {value!r}")
            object.__setattr__(self, name, int(value))  # any integer type, read by value
        if self.budget < 2:
            raise ValueError(f"DecodeTrim.budget must be >= 2 decode slots, got {self.budget}")
        if self.interval < 0 or self.window < 0:
            raise ValueError(f"DecodeTrim.interval and .window must be >= 0 (0: the default), got "
                             f"{self.interval}, {self.window}")
        object.__setattr__(self, "interval", self.interval or max(1, self.budget // 4))
        object.__setattr__(self, "window", self.window or max(1, min(16, self.budget // 4)))
        if self.interval + self.window > self.budget:
            raise ValueError(f"DecodeTrim: interval {self.interval} + window {self.window} must fit in the budget "
                             f"{self.budget} (a trim keeps budget - interval slots, the window among them)")

    @property
    def kept(self) -> int:
        """Slots a trim keeps (the window included)."""
        return self.budget - self.interval


def attach(cache, trim: DecodeTrim | None):
    """`cache` (a `cache.KVCache`, any decode capacity up to `trim.budget`) made to trim its decode segment:
    the static `decode_trim` set and a zero score per decode slot. `grow` then sizes the segment to exactly
    `trim.budget`. None: the cache unchanged."""
    if trim is None:
        return cache
    if cache.decode_capacity > trim.budget:
        raise ValueError(f"the cache already holds {cache.decode_capacity} decode slots, more than the decode "
                         f"budget {trim.budget}")
    return cache.replace(decode_trim=trim, dscore=jnp.zeros(cache.dpos.shape, jnp.float32))


def accumulate(cache, layer: jax.Array, q: jax.Array, dk: jax.Array, live: jax.Array, lse: jax.Array):
    """Add one step's attention on the decode slots to their scores in layer `layer`.

    q [B, Hq, D] post-RoPE queries; dk [B, Hkv, T, D] the layer's decode keys (dequantized); live
    [B, Hkv, T]; lse [B, Hq] f32 log-sum-exp of the step's scaled logits over every slot it attended
    (prompt pages and decode slots), so each share is the softmax weight the step gave the slot."""
    B, Hq, D = q.shape
    Hkv = dk.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    logits = jnp.einsum("bkgd,bktd->bkgt", qg, dk, preferred_element_type=jnp.float32) * D ** -0.5
    weight = jnp.exp(logits - lse.reshape(B, Hkv, Hq // Hkv, 1))
    share = jnp.where(live, weight.sum(2), 0.0)  # [B, Hkv, T]
    return cache.replace(dscore=cache.dscore.at[layer].add(share))


def trim_if_full(cache):
    """When the decode segment is full (decode_len == budget), keep `trim.kept` slots per (layer, row, kv
    head): the newest `window`, then the highest scores; the kept slots move to the front in their order
    and decode_len drops to `trim.kept`. Dead slots (a finished row's padding) score lowest."""
    trim = cache.decode_trim
    T = cache.decode_capacity

    def trim_now(c):
        t = jnp.arange(T, dtype=jnp.int32)
        newest = t >= c.decode_len - trim.window  # [T]: every (layer, row, head) filled the same slots
        alive = c.dpos >= 0
        score = jnp.where(alive, c.dscore, -jnp.inf)
        idx, _ = select_topk(score, jnp.full(c.dscore.shape[:3], trim.kept, jnp.int32), trim.kept,
                             protected=jnp.broadcast_to(newest, c.dpos.shape) & alive)

        def take(x, fill):
            g = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 4)), axis=3)
            pad = [(0, 0)] * 3 + [(0, T - trim.kept)] + [(0, 0)] * (x.ndim - 4)
            return jnp.pad(g, pad, constant_values=fill)

        moved = dict(dk=take(c.dk, 0), dv=take(c.dv, 0), dpos=take(c.dpos, -1), dscore=take(c.dscore, 0.0))
        if c.quantized:
            moved.update(dk_scale=take(c.dk_scale, 0.0), dv_scale=take(c.dv_scale, 0.0))
        return c.replace(decode_len=jnp.int32(trim.kept), **moved)

    return jax.lax.cond(cache.decode_len >= T, trim_now, lambda c: c, cache)
