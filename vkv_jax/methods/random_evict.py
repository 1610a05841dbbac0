"""Random eviction baseline (kvpress `RandomPress`): U(0,1) scores per (layer, row, kv head, slot), drawn from
the seed and the slot's position in its row (`slot_uniform`), so a row keeps the same set in any batch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vkv_jax import budgets
from vkv_jax.methods._common import Selection, TopKPlan, broadcast_lbhs, heads_marker, num_valid, slot_uniform
from vkv_jax.methods.options import BUDGET, Rule, check_fields, option


@dataclasses.dataclass(frozen=True)
class Random(TopKPlan):
    """Keep a random subset of each row's real prompt tokens, independently per layer and kv head.

    budget: ratio of the row's prompt tokens (default 0.1) or an absolute count per layer and head.
    seed:   PRNG seed (int, static); a slot's score depends on the seed, its layer, kv head and position in
            its row only, so the same row keeps the same set alone or in any batch.
    capacity(S, Nv) = budget_count(budget, S) (its power-of-two bucket when the budget is traced,
    `methods.split_budget`).
    Modality-blind: several images or anyres tiles change nothing but the prompt length.
    """

    traced_budget = "count"  # budget traced, capacity bucketed (methods.split_budget)
    budget: float | int = option(0.1, BUDGET)
    seed: int = option(0, Rule("int", lo=0, hi=2 ** 32 - 1))  # jax.random.key's uint32 seed

    def __post_init__(self):
        check_fields(self)

    def observe(self, q, k, ctx):
        return heads_marker(k)

    def observe_rows(self, prompt_len: int, ctx) -> int:
        """No query rows: `observe` reads only k's shape (a chunked prefill keeps no queries)."""
        return 0

    def selection(self, stats, ctx) -> Selection:
        L, B, H = stats.shape
        S = ctx.valid.shape[-1]
        scores = slot_uniform(jax.random.key(self.seed), ctx, L, H)
        allowed = broadcast_lbhs(ctx.valid, (L, B, H, S))
        counts = budgets.uniform(self.budget, num_valid(ctx), L, H)
        return Selection(scores, counts, jnp.zeros_like(allowed), allowed)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return budgets.static_count(self.budget, prompt_len)
