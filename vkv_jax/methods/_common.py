"""Helpers shared by the method modules: row facts from the context, recent windows, plan building."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from vkv_jax.methods.base import KeepPlan, Method, PrefillContext
from vkv_jax.selection import select_topk


class Selection(NamedTuple):
    """What `select_topk` needs for every layer: scores/protected/allowed [L, B, Hkv, S], counts [L, B, Hkv]."""

    scores: jax.Array
    counts: jax.Array
    protected: jax.Array
    allowed: jax.Array


def check_observe(q: jax.Array, k: jax.Array, ctx: PrefillContext) -> None:
    """Shape/dtype contract of `observe`: q [B, Hq, T, D] the queries of the last T <= S slots (T = S
    in a one-shot prefill; a chunked prefill hands over only the rows `observe_rows` asks for),
    k [B, Hkv, S, D] floats, Hkv | Hq, ctx fields [B, S] (trace-time checks only)."""
    chex.assert_rank([q, k], 4)
    chex.assert_type([q, k], float)
    chex.assert_equal_shape_prefix([q, k], 1)
    chex.assert_equal_shape_suffix([q, k], 1)
    chex.assert_shape([ctx.valid, ctx.tags, ctx.positions], (q.shape[0], k.shape[2]))
    chex.assert_is_divisible(q.shape[1], k.shape[1])
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"observe got {q.shape[2]} query rows for {k.shape[2]} keys")


def last_rows(q: jax.Array, W: int) -> jax.Array:
    """The queries of the last W slots, [B, Hq, W, D], from q [B, Hq, T, D] holding the last T >= W."""
    if q.shape[2] < W:
        raise ValueError(f"observe needs the queries of the last {W} slots, got {q.shape[2]}")
    return q[:, :, q.shape[2] - W:]


def num_valid(ctx: PrefillContext) -> jax.Array:
    """int32 [B] real prompt tokens per row."""
    return ctx.valid.sum(-1).astype(jnp.int32)


def num_visual(ctx: PrefillContext) -> jax.Array:
    return ctx.is_visual.sum(-1).astype(jnp.int32)


def tail_mask(n: jax.Array, S: int) -> jax.Array:
    """bool [..., S]: the last `n` slots (n [...] int). Rows are left-padded, so these are the
    last n real tokens whenever n <= the row's real length."""
    return jnp.arange(S, dtype=jnp.int32) >= (S - jnp.asarray(n, jnp.int32))[..., None]


def recent_window(counts: jax.Array, *, tokens: int | None = None, of_budget: float | None = None,
                  of_prompt: float | None = None, prompt_len: jax.Array | None = None) -> jax.Array:
    """The recent window a method protects, by the one rule every method follows: the window is part of
    the budget (never more than the kept count C) and a fractional size is floored (+1e-6, so 0.1 * 30
    is 3). Exactly one size: `tokens` (a fixed count, SnapKV's 32), `of_budget` (a fraction of C: H2O's
    0.5, VL-Cache's 0.1) or `of_prompt` (a fraction of the row's prompt length `prompt_len`, a window
    that scales with the prompt). counts [...] int32 (prompt_len broadcastable) -> int32 [...]."""
    if sum(x is not None for x in (tokens, of_budget, of_prompt)) != 1:
        raise ValueError("recent_window takes exactly one of tokens, of_budget, of_prompt")
    counts = jnp.asarray(counts, jnp.int32)
    if tokens is not None:
        w = jnp.full(counts.shape, tokens, jnp.int32)
    else:
        base = counts if of_budget is not None else jnp.asarray(prompt_len, jnp.int32)
        frac = of_budget if of_budget is not None else of_prompt
        w = jnp.floor(frac * base.astype(jnp.float32) + 1e-6).astype(jnp.int32)
    return jnp.minimum(w, counts)


def row_window(ctx: PrefillContext, min_rows: int = 50) -> int:
    """Static number of trailing query rows that can hold every row's post-vision region."""
    S = ctx.valid.shape[-1]
    if ctx.num_visual is None:
        return S
    return int(min(S, max(S - int(ctx.num_visual), min_rows)))


def heads_marker(k: jax.Array) -> jax.Array:
    """[B, Hkv] int8 zeros from k [B, Hkv, S, Dh]: the per-layer stats of a method that scores nothing, so
    its plan still reads L and Hkv from the stacked shape."""
    return jnp.zeros((k.shape[0], k.shape[1]), jnp.int8)


def slot_uniform(key: jax.Array, ctx: PrefillContext, layers: int, heads: int) -> jax.Array:
    """U(0, 1) draws [L, B, Hkv, S], each a function of (key, the slot's position in its own row, layer,
    kv head) only: a row draws the same numbers alone or in any batch, however far it is left-padded
    (rows of one batch draw alike at equal positions; padding slots draw too and are never kept)."""
    B, S = ctx.valid.shape
    positions = jnp.maximum(ctx.positions, 0).reshape(-1)
    draws = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(key, p), (layers, heads)))(positions)
    return draws.reshape(B, S, layers, heads).transpose(2, 0, 3, 1)


def broadcast_lbhs(x: jax.Array, shape) -> jax.Array:
    """Broadcast a [B, S] (or [L, B, S]) mask/score to [L, B, Hkv, S]."""
    L, B, H, S = shape
    if x.ndim == 2:
        x = x[None, :, None, :]
    elif x.ndim == 3:
        x = x[:, :, None, :]
    return jnp.broadcast_to(x, (L, B, H, S))


def plan_from_selection(sel: Selection, k_max: int) -> KeepPlan:
    idx, cnt = select_topk(sel.scores, sel.counts, k_max, sel.protected, sel.allowed)
    return KeepPlan(indices=idx, count=cnt)


class TopKPlan(Method):
    """Base of the methods that score every slot: they define `selection(stats, ctx) -> Selection`
    (scores, kept counts, protected and allowed slots) and `capacity`, and the plan is the top-k of the
    selection, `plan_width(ctx)` slots wide."""

    def plan(self, stats, ctx) -> KeepPlan:
        return plan_from_selection(self.selection(stats, ctx), self.plan_width(ctx))

    def plan_width(self, ctx) -> int:
        """Static width of the plan: the method's capacity for this prompt width."""
        return self.capacity(ctx.valid.shape[-1], 0)
