"""`ScorerMethod`: a method that only defines its scores (kvpress's `ScorerPress.score` is the model).

Subclass it as a frozen dataclass with a `budget` field and define `score`; the base supplies the rest of the
method contract: `observe` hands `score` the last `observation_window` query rows (so a chunked prefill
keeps only those), each (layer, row, kv head) keeps the top budget_count(budget, its row's prompt length)
scores (a ratio of the prompt or a count, as SnapKV reads it), and the budget is traced (one executable per
capacity bucket). Register it with `vkv_jax.methods.register(name, cls)` and it runs everywhere a built-in
method does: `generate` (either pool), chunked prefill, the evaluation harness, the bench and a mesh.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from vkv_jax import budgets
from vkv_jax.methods._common import Selection, TopKPlan, broadcast_lbhs, check_observe, last_rows, num_valid
from vkv_jax.methods.base import PrefillContext


class ScorerMethod(TopKPlan):
    traced_budget = "count"  # budget traced, capacity bucketed (methods.split_budget)
    observation_window: ClassVar[int] = 32  # trailing query rows `score` reads (0: none, keys only)

    def score(self, q: jax.Array, k: jax.Array, ctx: PrefillContext) -> jax.Array:
        """One layer's scores: q [B, Hq, W, D] the queries of the last W = min(observation_window, S)
        slots, k [B, Hkv, S, D] post-RoPE keys, ctx the prompt -> [B, Hkv, S] (higher is kept first;
        padding slots are never kept whatever they score)."""
        raise NotImplementedError(f"{type(self).__name__} must define score(q, k, ctx)")

    def observe(self, q, k, ctx, lse=None):
        check_observe(q, k, ctx)
        W = self.observe_rows(k.shape[2], ctx)
        return self.score(last_rows(q, W), k, ctx).astype(jnp.float32)

    def observe_rows(self, prompt_len: int, ctx) -> int:
        return min(self.observation_window, prompt_len)

    def selection(self, stats, ctx) -> Selection:
        L, B, H, S = stats.shape
        allowed = broadcast_lbhs(ctx.valid, (L, B, H, S))
        counts = budgets.uniform(self.budget, num_valid(ctx), L, H)
        return Selection(stats, counts, jnp.zeros_like(allowed), allowed)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return budgets.static_count(self.budget, prompt_len)
