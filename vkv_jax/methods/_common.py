"""Helpers shared by the method modules: row facts from the context, recent windows, plan building."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vkv_jax.methods.base import KeepPlan, PrefillContext
from vkv_jax.selection import select_topk


class Selection(NamedTuple):
    """What `select_topk` needs for every layer: scores/protected/allowed [L, B, Hkv, S], counts [L, B, Hkv]."""

    scores: jax.Array
    counts: jax.Array
    protected: jax.Array
    allowed: jax.Array


def num_valid(ctx: PrefillContext) -> jax.Array:
    """int32 [B] real prompt tokens per row."""
    return ctx.valid.sum(-1).astype(jnp.int32)


def num_visual(ctx: PrefillContext) -> jax.Array:
    return ctx.is_visual.sum(-1).astype(jnp.int32)


def tail_mask(n: jax.Array, S: int) -> jax.Array:
    """bool [..., S]: the last `n` slots (n [...] int). Rows are left-padded, so these are the
    last n real tokens whenever n <= the row's real length."""
    return jnp.arange(S, dtype=jnp.int32) >= (S - jnp.asarray(n, jnp.int32))[..., None]


def row_window(ctx: PrefillContext, min_rows: int = 50) -> int:
    """Static number of trailing query rows that can hold every row's post-vision region."""
    S = ctx.valid.shape[-1]
    if ctx.num_visual is None:
        return S
    return int(min(S, max(S - int(ctx.num_visual), min_rows)))


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
