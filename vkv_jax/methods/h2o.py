"""H2O (arXiv 2306.14048) as a one-shot post-prefill baseline: heavy hitters by accumulated attention + recent
window (as the VLM papers use it; the original evicts at every decoding step)."""

from __future__ import annotations

import dataclasses

from vkv_jax import budgets
from vkv_jax.methods import scoring
from vkv_jax.methods._common import (
    Selection,
    TopKPlan,
    broadcast_lbhs,
    check_observe,
    num_valid,
    recent_window,
    tail_mask,
)
from vkv_jax.methods.options import BUDGET, FRACTION, IMPL, POSITIVE_INT, check_fields, option


@dataclasses.dataclass(frozen=True)
class H2O(TopKPlan):
    """Score s[j] = sum over all prompt query rows i >= j of softmax attention A[i, j] (per query head,
    summed over each GQA group); keep the last floor(recent_fraction * C) tokens plus the top-scored
    rest, C per layer and kv head (the window rule of `_common.recent_window`).

    budget: ratio of the row's prompt tokens (default 0.1) or an absolute count C (recent included).
    recent_fraction: 0.5 of the budget, heavy hitters and recent tokens half each (the H2O paper's
            setting, and the CSP / LOOK-M code's hh = recent); 0.1 is VL-Cache's baseline setup (with
            10% on a ~75-token prompt the window is 0-1 tokens).
    block: query rows per scoring block (memory only): each block is one `window_scores` call.
    impl: 'auto' | 'kernel' | 'reference' for those calls (auto: kernel on TPU only).
    observe_lse: with impl 'auto' or 'reference' the prefill hands `observe` each layer's attention
    log-sum-exp (`llama.run_layers(observe_lse=True)`), and the column sums take one blocked pass
    (`scoring.colsum_from_lse`) instead of `window_scores`' two; impl='kernel' keeps the Pallas kernel.
    capacity(S, Nv) = budget_count(budget, S); with a traced budget (`methods.split_budget`) its
    power-of-two bucket (`budgets.count_bucket`), so one executable serves every budget in the bucket.
    Modality-blind: several images or anyres tiles change nothing but the prompt length.
    """

    traced_budget = "count"  # budget traced, capacity bucketed (methods.split_budget)
    budget: float | int = option(0.1, BUDGET)
    recent_fraction: float = option(0.5, FRACTION)
    block: int = option(256, POSITIVE_INT)
    impl: str = option("auto", IMPL)

    def __post_init__(self):
        check_fields(self)

    @property
    def observe_lse(self) -> bool:
        """Whether `observe` wants the prefill attention's log-sum-exp (`lse=`)."""
        return self.impl != "kernel"

    def observe(self, q, k, ctx, lse=None):
        check_observe(q, k, ctx)
        if lse is not None:
            return scoring.colsum_from_lse(q, k, lse, ctx.valid)  # [B, Hkv, S]
        return scoring.full_softmax_colsum(q, k, ctx.valid, self.block, self.impl)  # [B, Hkv, S]

    def observe_chunk(self, q, k, lse, key_valid):
        """A chunked prefill's share of `observe`: the column sums of one chunk's query rows, q
        [B, Hq, T, D] at the last T of the C slots in k [B, Hkv, C, D] (every key the chunk sees), lse
        [B, Hq, T] from the chunk's attention, key_valid [B, C]. float32 [B, Hkv, C]: every row's softmax
        is complete inside its chunk, so the chunks' shares sum to `observe`'s.
        Uses the log-sum-exp pass whatever `impl` says (the kernel's two passes need every row at once)."""
        return scoring.colsum_from_lse(q, k, lse, key_valid)

    def selection(self, stats, ctx) -> Selection:
        L, B, H, S = stats.shape
        counts = budgets.uniform(self.budget, num_valid(ctx), L, H)
        w = recent_window(counts, of_budget=self.recent_fraction)
        allowed = broadcast_lbhs(ctx.valid, (L, B, H, S))
        return Selection(stats, counts, tail_mask(w, S) & allowed, allowed)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return budgets.static_count(self.budget, prompt_len)
