"""Reference rows of the equal-KV table: what a method must beat at the same live KV share.

* ``text only``: every text token, no visual token (one share: the prompt's text fraction);
* ``recency only``: the last C prompt tokens (StreamingLLM without sinks);
* ``text + random visual``: every text token plus a random share of the visual tokens (AirCache's
  keep-all-text rule with random instead of elite-window scores).

Each is a method dataclass with the `vkv_jax.methods` interface (observe / plan / capacity); they are
evaluation tools, not registered methods.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vkv_jax import budgets
from vkv_jax.methods import Compression, KeepPlan, Method, build, slot_uniform
from vkv_jax.selection import select_topk


@dataclasses.dataclass(frozen=True)
class TextAndRandomVisual(Method):
    """Keep every real non-visual token and floor(budget * N_v + u) visual tokens drawn at random per
    (layer, row, kv head), u ~ U(0, 1) per (layer, kv head) so that the mean kept count is
    budget * N_v (its KV share moves smoothly with the budget); with_visual=False keeps the text only.

    budget: ratio of the row's visual tokens (traced, `methods.split_budget`), as AirCache's.
    capacity(S, Nv) = S (the kept visual count is traced).
    """

    traced_budget = "none"
    budget: float = 0.1
    seed: int = 0
    with_visual: bool = True

    def observe(self, q, k, ctx):
        return jnp.zeros((k.shape[0], k.shape[1]), jnp.int8)  # [B, Hkv]: gives plan L and Hkv

    def plan(self, stats, ctx):
        L, B, H = stats.shape
        S = ctx.valid.shape[-1]
        vis, text = ctx.is_visual, ctx.valid & ~ctx.is_visual
        n_vis = vis.sum(-1).astype(jnp.float32)
        r = budgets.budget_value(self.budget) if self.with_visual else 0.0
        score_key, dither_key = jax.random.split(jax.random.key(self.seed))
        # drawn per (layer, kv head) and slot position, never per batch index: a row keeps what it keeps alone
        dither = jax.random.uniform(dither_key, (L, 1, H)) if self.with_visual else 0.0
        keep_vis = jnp.floor(jnp.asarray(r, jnp.float32) * n_vis[None, :, None] + dither).astype(jnp.int32)
        counts = text.sum(-1)[None, :, None] + jnp.minimum(keep_vis, n_vis[None, :, None].astype(jnp.int32))
        scores = slot_uniform(score_key, ctx, L, H)
        shape = (L, B, H, S)
        idx, cnt = select_topk(scores, counts, S, jnp.broadcast_to(text[None, :, None], shape),
                               jnp.broadcast_to(ctx.valid[None, :, None], shape))
        return KeepPlan(indices=idx, count=cnt)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return prompt_len


REFERENCES = ("text only", "recency only", "text + random visual")


def reference_method(name: str, budget: float | None = 0.1):
    """The method object of a reference row ("text only" takes no budget)."""
    if name == "text only":
        return TextAndRandomVisual(budget=1.0, with_visual=False)
    if name == "recency only":
        return build(Compression("streamingllm", budget=budget, n_sink=0))
    if name == "text + random visual":
        return TextAndRandomVisual(budget=budget)
    raise ValueError(f"unknown reference row {name!r}; expected one of {', '.join(REFERENCES)}")
