"""SnapKV (arXiv 2404.14469) and PyramidKV (arXiv 2406.02069): observation-window scoring + pooling."""

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
    tail_mask,
)
from vkv_jax.methods.options import BUDGET, IMPL, POSITIVE_INT, Rule, check_fields, option
from vkv_jax.pallas_kernels import window_scores


def snapkv_scores(q, k, valid, window: int, kernel: int, pooling: str, impl: str = "auto",
                  row_window: jnp.ndarray | None = None) -> jnp.ndarray:
    """float32 [B, Hkv, S]: window attention summed over the last `window` rows (causal), restricted
    to prefix keys (slots < S - window), pooled per query head, then summed over each GQA group.
    q [B, Hq, T, D]: the queries of the last T >= min(window, S) slots; k [B, Hkv, S, D].
    row_window [B] int32 (each <= window): a window per row instead (one that scales with the prompt)."""
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    W = min(window, S)
    rows, prefix = None, jnp.arange(S) < S - W
    if row_window is not None:
        rows = scoring.row_slots(S, W)[None] >= (S - row_window)[:, None]  # [B, W]
        prefix = (jnp.arange(S)[None] < (S - row_window)[:, None])[:, None]  # [B, 1, S]
    s = window_scores(last_rows(q, W), k, scoring.query_slots(valid, W, rows), valid, per_head=True,
                      impl=impl).colsum_heads  # [B, Hq, S]
    s = jnp.where(prefix, s, 0.0)  # the window is kept anyway; pool the prefix only
    s = scoring.pool1d(s, kernel, pooling)
    s = jnp.where(prefix, s, 0.0)
    return s.reshape(B, Hkv, Hq // Hkv, S).sum(2)


@dataclasses.dataclass(frozen=True)
class SnapKV(TopKPlan):
    """Keep the last `window` prompt tokens plus the top (C - window) prefix tokens per kv head.

    budget: ratio of the row's prompt tokens (default 0.1) or an absolute count C per layer and head,
            window included (kvpress / KVCache-Factory convention). If C < window only the last C.
    window: 32, kernel: 7, pooling: 'max' (the paper's LongBench setting; kvpress uses 64/5/avg).
            The window is part of the budget: min(window, C) tokens (`_common.recent_window`); a budget
            C <= window keeps the last C tokens, i.e. recency.
    window_ratio: None, or a window that scales with the prompt: floor(window_ratio * row length)
            observation rows and protected tokens (the CSP / LOOK-M code's int(0.1 S)); SnapKV only.
    GQA: probabilities per query head, pooled per head, summed over the group (the original code stores a
            cache per query head; kvpress averages over the group, which ranks the same).
    impl: 'auto' | 'kernel' | 'reference' for the `window_scores` call (auto: kernel on TPU only).
    capacity(S, Nv) = budget_count(budget, S); with a traced budget (`methods.split_budget`) its
    power-of-two bucket (`budgets.count_bucket`), so one executable serves every budget in the bucket.
    Modality-blind (as PyramidKV): several images or anyres tiles change nothing but the prompt length.
    """

    traced_budget = "count"  # budget traced, capacity bucketed (methods.split_budget)
    budget: float | int = option(0.1, BUDGET)
    window: int = option(32, POSITIVE_INT)
    kernel: int = option(7, POSITIVE_INT)
    pooling: str = option("max", Rule("choice", choices=("max", "avg")))
    impl: str = option("auto", IMPL)
    window_ratio: float | None = option(None, Rule("float", lo=0.0, hi=1.0, lo_open=True, optional=True))

    def __post_init__(self):
        check_fields(self)

    def observe(self, q, k, ctx):
        check_observe(q, k, ctx)
        if self.window_ratio is None:
            return snapkv_scores(q, k, ctx.valid, self.window, self.kernel, self.pooling, self.impl)
        S = k.shape[2]
        rows = recent_window(jnp.full(ctx.valid.shape[:1], S), of_prompt=self.window_ratio,
                             prompt_len=num_valid(ctx))
        W = self.observe_rows(S, ctx)
        return snapkv_scores(q, k, ctx.valid, W, self.kernel, self.pooling, self.impl, row_window=rows)

    def observe_rows(self, prompt_len: int, ctx) -> int:
        """Static number of trailing query rows `observe` reads (a chunked prefill keeps only these):
        the window, or with window_ratio the widest row's floor(window_ratio * S)."""
        if self.window_ratio is None:
            return min(self.window, prompt_len)
        return min(prompt_len, max(1, math.floor(self.window_ratio * prompt_len + 1e-6)))

    def protected_window(self) -> int:
        """The observation window, always kept (its fixed size; with window_ratio the window scales)."""
        return self.window

    def counts(self, ctx, L: int, H: int):
        return budgets.uniform(self.budget, num_valid(ctx), L, H)

    def window_size(self, counts, ctx):
        """[L, B, H] protected recent tokens (`_common.recent_window`)."""
        if self.window_ratio is None:
            return recent_window(counts, tokens=self.window)
        return recent_window(counts, of_prompt=self.window_ratio, prompt_len=num_valid(ctx)[None, :, None])

    def selection(self, stats, ctx) -> Selection:
        L, B, H, S = stats.shape
        counts = self.counts(ctx, L, H)
        allowed = broadcast_lbhs(ctx.valid, (L, B, H, S))
        protected = tail_mask(self.window_size(counts, ctx), S) & allowed
        return Selection(stats, counts, protected, allowed)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return budgets.static_count(self.budget, prompt_len)


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV scoring with layer budgets decreasing linearly with depth (`budgets.pyramid`, beta=20).

    budget: ratio of the row's prompt tokens (default 0.1) or absolute count: the *mean* per-layer C,
    window included. capacity(S, Nv) = the first layer's count for an S-token row
    (2B - B // beta + window, B = C - window, capped at S), from C's bucket when the budget is traced.
    On a device mesh the layer schedule depends only on each row's valid length, so it is the one-device
    schedule on every shard (tests/test_sharding.py covers the SnapKV family through AdaKV).
    """

    beta: int = option(20, POSITIVE_INT)  # min_b = B // beta: 1 gives the flattest pyramid

    def __post_init__(self):
        super().__post_init__()
        if self.window_ratio is not None:
            raise ValueError("pyramidkv's layer budgets are built around a fixed window: window_ratio is SnapKV's")

    def counts(self, ctx, L: int, H: int):
        return budgets.pyramid(self.budget, num_valid(ctx), L, H, self.window, self.beta)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return budgets.pyramid_capacity(self.budget, prompt_len, self.window, self.beta)

    def total_capacity(self, prompt_len: int, num_visual: int, num_layers: int, num_kv_heads: int) -> int:
        """Static bound on the slots kept over all layers and kv heads of one row (sizes the page pool):
        the pyramid's layer counts for an S-token row (their mean is about C)."""
        S, L = prompt_len, num_layers
        C = budgets.static_count(self.budget, S)
        w = min(self.window, C)
        b = C - w
        min_b, max_b = b // self.beta, 2 * b - b // self.beta
        if max_b >= S - w:
            max_b, min_b = S - w, 2 * b - (S - w)
        steps = (max_b - min_b) // max(L - 1, 1)
        counts = ([S] * L if S <= C else [C] * L if S < 2 * b
                  else [min(S, max(1, max_b - layer * steps + w)) for layer in range(L)])
        return num_kv_heads * min(L * self.capacity(S, num_visual), sum(counts))
