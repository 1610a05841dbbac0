"""StreamingLLM (arXiv 2309.17453) as a one-shot post-prefill baseline: attention sinks + the most recent
tokens."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vkv_jax import budgets
from vkv_jax.methods._common import Selection, TopKPlan, broadcast_lbhs, heads_marker, num_valid, tail_mask
from vkv_jax.methods.options import BUDGET, Rule, check_fields, option


@dataclasses.dataclass(frozen=True)
class StreamingLLM(TopKPlan):
    """Keep the first `n_sink` real tokens and the last `C - n_sink` (C = kept per layer and head).

    budget: ratio of the row's prompt tokens (default 0.1) or an absolute count C, sinks included.
    n_sink: 4 (StreamingLLM / kvpress default); if C < n_sink only the first C tokens are kept.
    Keys keep their original positions (no re-rotation). capacity(S, Nv) = budget_count(budget, S)
    (its power-of-two bucket when the budget is traced, `methods.split_budget`).
    Modality-blind: several images or anyres tiles change nothing but the prompt length.
    """

    traced_budget = "count"  # budget traced, capacity bucketed (methods.split_budget)
    budget: float | int = option(0.1, BUDGET)
    n_sink: int = option(4, Rule("int", lo=0))

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
        counts = budgets.uniform(self.budget, num_valid(ctx), L, H)  # [L, B, H]
        sinks = jnp.minimum(self.n_sink, counts)
        # positions count from the row's first real token, so sinks are real tokens 0..n_sink-1.
        sink_mask = (ctx.positions[None, :, None, :] < sinks[..., None]) & ctx.valid[None, :, None, :]
        protected = sink_mask | tail_mask(counts - sinks, S)
        allowed = broadcast_lbhs(ctx.valid, (L, B, H, S))
        return Selection(jnp.zeros((L, B, H, S), jnp.float32), counts, protected & allowed, allowed)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return budgets.static_count(self.budget, prompt_len)
