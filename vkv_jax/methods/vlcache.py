"""VL-Cache (Tu et al., arXiv 2410.23317): sparsity-adaptive layer budgets + post-vision attention scores.

Query rows P = the prompt tokens after the last visual token (the paper's "post-vision" rows); sparsity by
the paper's ThresholdFilter (Eq. 1-2), layer budgets by its Algorithm 1. No official code is public: the
choices the paper leaves open are options (see the class docstring).

On a device mesh (`vkv_jax.load(..., mesh=...)`) the sparsity and the layer budgets (Algorithm 1, over all
layers) are computed by this same global-view code: `jit` (GSPMD) reduces over the `model` (kv heads) and
`data` (rows) shards where the scores are split, so they equal the one-device budgets
(tests/test_sharding.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from vkv_jax import budgets
from vkv_jax.methods import scoring
from vkv_jax.methods._common import (
    Selection,
    TopKPlan,
    broadcast_lbhs,
    check_observe,
    last_rows,
    num_valid,
    recent_window,
    row_window,
    tail_mask,
)
from vkv_jax.methods.options import BOOL, BUDGET, FRACTION, IMPL, Rule, check_fields, option
from vkv_jax.pallas_kernels import window_scores

FALLBACK_ROWS = 50  # nothing follows the image (paper: undefined): the last 50 prompt tokens, its speed setting


def vlcache_rows(ctx, W: int, query_rows: int | None) -> jnp.ndarray:
    """bool [B, W]: which of the last W slots are query rows (post-vision P, or the fallback)."""
    S = ctx.valid.shape[-1]
    slots = scoring.row_slots(S, W)
    qv = ctx.valid[:, slots]
    if query_rows is not None:
        return qv & (slots >= S - query_rows)[None]
    v_end = scoring.last_visual_end(ctx.is_visual)  # [B]
    post = qv & (slots[None] >= v_end[:, None])
    fallback = qv & (slots >= S - FALLBACK_ROWS)[None]
    return jnp.where(post.any(-1, keepdims=True), post, fallback)


def vlcache_layer_stats(q, k, valid, rows, p: float = 0.01, impl: str = "auto"):
    """One layer's VL-Cache statistics.

    q [B, Hq, W, D] rows' queries (last W slots); k [B, Hkv, S, D]; valid [B, S]; rows [B, W] bool.
    Returns (density [B] = 1 - mean over query heads of the ThresholdFilter sparsity (Eq. 1-2),
             scores [B, Hkv, S] = post-vision attention summed over rows and each GQA group).
    """
    W = q.shape[2]
    q_slot = scoring.query_slots(valid, W, rows)
    ws = window_scores(q, k, q_slot, valid, threshold_p=p, impl=impl)
    # Sparsity denominator: every causally visible entry of the post-vision rows, sum_i (pos_i + 1).
    n_vis = scoring.visible_keys(valid, q_slot).sum(-1).astype(jnp.float32)  # [B]
    kept = ws.count_above.sum(-1).astype(jnp.float32)  # [B, Hq]
    sparsity = 1.0 - kept / jnp.maximum(n_vis, 1.0)[:, None]
    density = 1.0 - sparsity.mean(-1)
    return density, ws.colsum


@dataclasses.dataclass(frozen=True)
class VLCache(TopKPlan):
    """VL-Cache.

    budget: alpha, ratio of the row's whole prompt KV (default 0.1), or an absolute mean count per
            layer (alpha = count / m per row). Layer l keeps k[l] = max(1, floor(beta[l] * m)),
            beta[l] = clip(d[l] / sum d * alpha * L, beta_min, beta_max), d = 1 - sparsity.
    p: 0.01 ThresholdFilter (relative to row max).
    recent_fraction: 0.1 of k[l] kept as the recent window (the paper's experiments keep 10% of the budget
            as a recent window without saying whether VL-Cache does too); 0.0 isolates the pure method.
    head_shared: False = independent top-k per kv head on group-summed scores (the paper scores per head
            and leaves GQA open); True = one set per layer.
    renormalize: False (paper: no renormalisation after clipping); True redistributes the clipped excess so
            sum beta = alpha L.
    exact_sum: False (the paper leaves rounding open); True apportions round(sum_l beta m) by largest remainder.
    beta_min, beta_max: 0.01, 1.0 (paper's clip); lowering beta_max (an option beyond the paper) bounds the
            cache capacity.
    query_rows: None = all post-vision rows (accuracy setting); n = the last n prompt tokens (the
            paper's speed-benchmark setting uses 50).
    impl: 'auto' | 'kernel' | 'reference' for the `window_scores` call (auto: kernel on TPU only).
    capacity(S, Nv) = min(S, floor(beta_max * S) (+1 with exact_sum)); = S with the paper's clip.
    It does not depend on the budget, so the budget is traced (`methods.split_budget`).
    Several images / anyres tiles: the post-vision query rows start after the row's last visual token (text
    between images counts as prompt, not as a query); the static row window covers the row with the fewest
    visual tokens.
    """

    traced_budget = "none"  # budget traced (methods.split_budget)
    budget: float | int = option(0.1, BUDGET)
    p: float = option(0.01, Rule("float", lo=0.0, hi=1.0, lo_open=True, hi_open=True))
    recent_fraction: float = option(0.1, FRACTION)
    head_shared: bool = option(False, BOOL)
    renormalize: bool = option(False, BOOL)
    exact_sum: bool = option(False, BOOL)
    beta_min: float = option(0.01, FRACTION)
    beta_max: float = option(1.0, FRACTION)
    query_rows: int | None = option(None, Rule("int", lo=1, optional=True))
    impl: str = option("auto", IMPL)

    def __post_init__(self):
        check_fields(self)
        if self.beta_min > self.beta_max:
            raise ValueError(f"vlcache's beta_min {self.beta_min} must be <= beta_max {self.beta_max}")

    def observe(self, q, k, ctx):
        check_observe(q, k, ctx)
        W = self.observe_rows(k.shape[2], ctx)
        rows = vlcache_rows(ctx, W, self.query_rows)
        density, scores = vlcache_layer_stats(last_rows(q, W), k, ctx.valid, rows, self.p, self.impl)
        return {"density": density, "scores": scores}

    def observe_rows(self, prompt_len: int, ctx) -> int:
        """Static number of trailing query rows `observe` reads (a chunked prefill keeps only these):
        `query_rows`, or the rows that can hold every row's post-vision region (`row_window`)."""
        if self.query_rows is not None:
            return min(prompt_len, self.query_rows)
        return row_window(ctx, FALLBACK_ROWS)

    def selection(self, stats, ctx) -> Selection:
        scores = stats["scores"]
        L, B, H, S = scores.shape
        m = num_valid(ctx)
        if budgets.is_ratio(self.budget):
            alpha = budgets.budget_value(self.budget)
        else:
            alpha = budgets.budget_value(self.budget) / jnp.maximum(m, 1).astype(jnp.float32)
        counts = budgets.vlcache(stats["density"], alpha, m, H, self.beta_min, self.beta_max,
                                 self.renormalize, self.exact_sum)
        if self.head_shared:
            scores = jnp.broadcast_to(scores.sum(2, keepdims=True), scores.shape)
        w = recent_window(counts, of_budget=self.recent_fraction)
        allowed = broadcast_lbhs(ctx.valid, (L, B, H, S))
        return Selection(scores, counts, tail_mask(w, S) & allowed, allowed)

    def total_capacity(self, prompt_len: int, num_visual: int, num_layers: int, num_kv_heads: int) -> int:
        """Static bound on the slots kept over all layers and kv heads of one row (sizes the page pool):
        sum_l beta[l] <= (alpha + beta_min) L, each layer's floor / max(1, .) adds at most one."""
        S, L = prompt_len, num_layers
        a = budgets.ratio_bound(self.budget, S)
        if a >= 1.0:
            return L * num_kv_heads * S
        # max(1, floor(.)) lifts a layer only where beta_min * S < 1 could leave it empty
        lift = L if self.beta_min * S < 1 else 0
        total = int(math.floor((a + self.beta_min) * L * S + 1e-4)) + lift + (L if self.exact_sum else 0)
        return num_kv_heads * min(L * self.capacity(S, num_visual), total)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        extra = 1 if self.exact_sum else 0
        return max(1, min(prompt_len, int(math.floor(self.beta_max * prompt_len + 1e-4)) + extra))
