"""AirCache (Huang et al., arXiv 2503.23956): elite observation window, strength+skewness layer budgets.

Only visual tokens are evicted; every non-visual token is kept, as in the paper. No official code is
public, so where it leaves a choice open (the instruction pool, how heads are combined, how the layer
statistics are normalised) the docstrings below say which choice is made and which option changes it.

On a device mesh (`vkv_jax.load(..., mesh=...)`) the strength / skewness statistics and the layer budgets are
computed by this same global-view code: `jit` (GSPMD) reduces over the `model` (kv heads) and `data` (rows)
shards where the scores are split, so they equal the one-device budgets (tests/test_sharding.py).
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
    heads_marker,
    last_rows,
    num_visual,
    row_window,
)
from vkv_jax.methods.options import BOOL, BUDGET, IMPL, SHARE, Rule, check_fields, option
from vkv_jax.pallas_kernels import window_scores


def instruction_pool(ctx, W: int) -> jnp.ndarray:
    """bool [B, W] over the last W slots: the instruction pool T = non-visual real tokens after the
    last visual token (the paper says "instruction tokens" without fixing the span; this one leaves out the
    system prompt and its attention sink); if that is empty, all non-visual real tokens in the window (a case
    the paper does not cover)."""
    S = ctx.valid.shape[-1]
    slots = scoring.row_slots(S, W)
    text = ctx.valid[:, slots] & ~ctx.is_visual[:, slots]
    v_end = scoring.last_visual_end(ctx.is_visual)
    post = text & (slots[None] >= v_end[:, None])
    return jnp.where(post.any(-1, keepdims=True), post, text)


def elite_window(q_ref, k, text_keys, a_rel: float = 0.9, *, ref_slot=None, impl: str = "auto"):
    """AirCache's elite observation window: elite tokens from the last instruction token's attention over
    instruction keys.

    q_ref [B, Hq, D] the reference row's query; k [B, Hkv, S, D]; text_keys [B, S] (pool T, all at
    slots <= ref_slot); ref_slot [B] int32 the reference row's slot, -1 when the pool is empty
    (None: S - 1, i.e. no causal cut beyond text_keys).
    Probabilities per query head, averaged over heads (the paper writes one attention matrix and leaves
    heads open), thresholded at a_rel * max.
    Returns (elite [B, S] bool, att [B, S] head-mean probabilities).
    """
    B, S = text_keys.shape
    if ref_slot is None:
        ref_slot = jnp.full((B,), S - 1, jnp.int32)
    ws = window_scores(q_ref[:, :, None], k, ref_slot[:, None], text_keys, per_head=True, impl=impl)
    att = ws.colsum_heads.mean(1)  # one row, so the row sum is the row: [B, Hq, S] -> [B, S]
    elite = (att >= a_rel * att.max(-1, keepdims=True)) & text_keys
    return elite, att


def visual_importance(q_win, k, valid, is_visual, elite, impl: str = "auto"):
    """AirCache's visual importance: I_v [B, S] = mean over elite rows of head-mean softmax over keys
    V ∪ {elite e' <= e} (causality among the elite keys: the paper is silent; the causal mask applies).

    q_win [B, Hq, W, D] queries of the last W slots; elite [B, S]. Zero on non-visual slots.
    """
    W = q_win.shape[2]
    rows = elite[:, scoring.row_slots(k.shape[2], W)]  # [B, W]
    ws = window_scores(q_win, k, scoring.query_slots(valid, W, rows), valid,
                       key_allowed=is_visual | elite, impl=impl)
    a = ws.colsum.sum(1) / q_win.shape[1]  # sum over rows and query heads / Hq -> [B, S]
    n_e = jnp.maximum(rows.sum(-1), 1).astype(jnp.float32)
    return jnp.where(is_visual, a / n_e[:, None], 0.0)


def strength_skewness(imp, is_visual):
    """AirCache's layer statistics: strength s_t = sum I_v; skewness s_k = N/((N-1)(N-2)) sum ((I - mu)/sigma)^3
    with ddof=1 sigma (the paper leaves ddof open; this is scipy.stats.skew(bias=False)).
    imp, is_visual [B, S] -> ([B], [B]); s_k = 0 if N < 3 or sigma 0."""
    n = is_visual.sum(-1).astype(jnp.float32)
    x = jnp.where(is_visual, imp, 0.0)
    st = x.sum(-1)
    mu = st / jnp.maximum(n, 1.0)
    dev = jnp.where(is_visual, imp - mu[:, None], 0.0)
    sd = jnp.sqrt((dev ** 2).sum(-1) / jnp.maximum(n - 1.0, 1.0))
    z3 = ((dev / jnp.where(sd > 0, sd, 1.0)[:, None]) ** 3).sum(-1)
    ok = (n >= 3) & (sd > 0)
    sk = jnp.where(ok, n / jnp.maximum((n - 1.0) * (n - 2.0), 1.0) * z3, 0.0)
    return st, sk


@dataclasses.dataclass(frozen=True)
class AirCache(TopKPlan):
    """AirCache.

    budget: r, ratio of the row's *visual* tokens (default 0.1; non-visual tokens are always all kept),
            or an absolute mean count of visual tokens per layer (r = count / N_v).
    a_rel: 0.9 elite threshold relative to the max (last instruction token's row).
    eps: 1e-6 lower clip of skewness before the mean-1 layer normalisation (a guard the paper leaves open;
            the paper only says the statistics are "normalised across layers", and mean 1 keeps the total).
    max_ratio: 1.0 upper clip of r_hat[l] (paper); lower values (an option beyond the paper) bound the cache
            capacity.
    exact_sum: False (paper: round and clip); True redistributes clipped mass and apportions round(r N_v L)
            over layers by largest remainder.
    One elite set, importance vector and kept index set per layer, shared by all kv heads (the paper's
    per-layer statistics presuppose one distribution per layer; it does not mention heads).
    impl: 'auto' | 'kernel' | 'reference' for the `window_scores` calls (auto: kernel on TPU only).
    capacity(S, Nv) = S - Nv + min(Nv, ceil(max_ratio * Nv)) (= S with the paper's clip; S if Nv = 0).
    It does not depend on the budget, so the budget is traced (`methods.split_budget`).
    Several images / anyres tiles: all of a row's visual tokens (every image; base crops, tiles and newline
    tokens) form one pool N_v, counted per row (rows may differ); the instruction pool is the text after the
    row's last visual token. Capacity uses the fewest visual tokens of any row (the widest row).
    """

    traced_budget = "none"  # budget traced (methods.split_budget)
    budget: float | int = option(0.1, BUDGET)
    a_rel: float = option(0.9, SHARE)
    eps: float = option(1e-6, Rule("float", lo=0.0, lo_open=True))
    max_ratio: float = option(1.0, SHARE)
    exact_sum: bool = option(False, BOOL)
    impl: str = option("auto", IMPL)

    def __post_init__(self):
        check_fields(self)

    def observe(self, q, k, ctx):
        check_observe(q, k, ctx)
        S = k.shape[2]
        W = self.observe_rows(S, ctx)
        q_win = last_rows(q, W)  # [B, Hq, W, D]: slots S - W .. S - 1
        pool = instruction_pool(ctx, W)  # [B, W]
        text_keys = jnp.zeros(ctx.valid.shape, bool).at[:, S - W:].set(pool)
        ref = jnp.where(pool, scoring.row_slots(S, W)[None], -1).max(-1)  # last instruction slot
        at = jnp.maximum(ref - (S - W), 0)[:, None, None, None]  # its row in the window
        q_ref = jnp.take_along_axis(q_win, at, axis=2)[:, :, 0]
        elite, _ = elite_window(q_ref, k, text_keys, self.a_rel, ref_slot=ref, impl=self.impl)
        vis = ctx.is_visual
        imp = visual_importance(q_win, k, ctx.valid, vis, elite, self.impl)
        st, sk = strength_skewness(imp, vis)
        return {"importance": imp, "strength": st, "skewness": sk, "kv_heads": heads_marker(k)}

    def observe_rows(self, prompt_len: int, ctx) -> int:
        """Static number of trailing query rows `observe` reads (a chunked prefill keeps only these):
        the rows that can hold every row's instruction pool and elite window (`row_window`)."""
        return row_window(ctx)

    def selection(self, stats, ctx) -> Selection:
        imp = stats["importance"]  # [L, B, S]
        L, B, S = imp.shape
        H = stats["kv_heads"].shape[2]
        nv = num_visual(ctx)
        r = budgets.budget_value(self.budget) if budgets.is_ratio(self.budget) else (
            budgets.budget_value(self.budget) / jnp.maximum(nv, 1).astype(jnp.float32))
        n_v = budgets.aircache(stats["strength"], stats["skewness"], r, nv, 1, self.eps,
                               self.max_ratio, self.exact_sum)[..., 0]  # [L, B]
        vis = ctx.is_visual
        text = ctx.valid & ~vis
        counts = n_v + text.sum(-1)[None].astype(jnp.int32)
        shape = (L, B, H, S)
        return Selection(broadcast_lbhs(imp, shape),
                         jnp.broadcast_to(counts[..., None], (L, B, H)),
                         broadcast_lbhs(text, shape), broadcast_lbhs(ctx.valid, shape))

    def plan_width(self, ctx) -> int:
        S = ctx.valid.shape[-1]
        # Without the static visual count, the only safe plan width is the whole prompt.
        return self.capacity(S, ctx.num_visual) if ctx.num_visual is not None else S

    def total_capacity(self, prompt_len: int, num_visual: int, num_layers: int, num_kv_heads: int) -> int:
        """Static bound on the slots kept over all layers and kv heads of one row (sizes the page pool):
        every text slot in every layer, and visual counts whose layer ratios average r (rounding and the
        floor of one add at most one a layer)."""
        nv, L = min(num_visual, prompt_len), num_layers
        if nv <= 0:
            return L * num_kv_heads * prompt_len
        r = budgets.ratio_bound(self.budget, prompt_len) if budgets.is_ratio(self.budget) else (
            min(1.0, budgets.static_count(self.budget, prompt_len) / nv))
        visual = min(L * (self.capacity(prompt_len, num_visual) - (prompt_len - nv)),
                     int(math.ceil(r * nv * L - 1e-6)) + L)
        return num_kv_heads * (L * (prompt_len - nv) + visual)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        nv = min(num_visual, prompt_len)
        if nv <= 0:
            return prompt_len
        return prompt_len - nv + min(nv, int(math.ceil(self.max_ratio * nv - 1e-6)))
