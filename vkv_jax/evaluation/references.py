"""Reference rows of the equal-KV table: what a method must beat at the same live KV share.

* ``text only``: every text token, no visual token (one share: the prompt's text fraction);
* ``recency only``: the last C prompt tokens (StreamingLLM without sinks);
* ``text + random visual``: every text token plus a random share of the visual tokens (AirCache's
  keep-all-text rule with random instead of elite-window scores);
* ``pooled visual kxk``: every text token plus the visual KV average-pooled over k x k blocks of the
  image's token grid (the downsampling baseline: one share per k, no budget);
* ``oracle evidence``: every text token plus the visual tokens holding the answer's evidence, padded
  with random visual tokens to the budget (the upper bound a selection can reach at that share; only
  where the questions know their evidence cells: the synthetic testbeds).

Each is a method dataclass with the `vkv_jax.methods` interface (observe / plan / capacity); they are
evaluation tools, not registered methods.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import budgets
from vkv_jax.methods import Compression, KeepPlan, Method, build, heads_marker, slot_uniform
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
        return heads_marker(k)

    def plan(self, stats, ctx):
        return self.plan_ranked(stats, ctx, budgets.budget_value(self.budget) if self.with_visual else 0.0)

    def plan_ranked(self, stats, ctx, r, first=None):
        """The plan at visual ratio `r`; `first` [B, S] bool: visual slots drawn before any other."""
        L, B, H = stats.shape
        S = ctx.valid.shape[-1]
        vis, text = ctx.is_visual, ctx.valid & ~ctx.is_visual
        n_vis = vis.sum(-1).astype(jnp.float32)
        score_key, dither_key = jax.random.split(jax.random.key(self.seed))
        # drawn per (layer, kv head) and slot position, never per batch index: a row keeps what it keeps alone
        dither = jax.random.uniform(dither_key, (L, 1, H)) if self.with_visual else 0.0
        keep_vis = jnp.floor(jnp.asarray(r, jnp.float32) * n_vis[None, :, None] + dither).astype(jnp.int32)
        counts = text.sum(-1)[None, :, None] + jnp.minimum(keep_vis, n_vis[None, :, None].astype(jnp.int32))
        scores = slot_uniform(score_key, ctx, L, H)
        if first is not None:  # U(0, 1) draws: +2 ranks these above every other visual slot
            scores = scores + 2.0 * first[None, :, None, :]
        shape = (L, B, H, S)
        idx, cnt = select_topk(scores, counts, S, jnp.broadcast_to(text[None, :, None], shape),
                               jnp.broadcast_to(ctx.valid[None, :, None], shape))
        return KeepPlan(indices=idx, count=cnt)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return prompt_len


@dataclasses.dataclass(frozen=True)
class OracleEvidence(TextAndRandomVisual):
    """`TextAndRandomVisual` whose visual draw takes the answer's evidence tokens first: every text
    token, the evidence, then random visual tokens up to floor(budget * N_v + u) visual tokens in all
    (evidence beyond that count is cut, lowest draws first).

    The evidence is data of the batch, not of the method: the harness binds it with the traced budget
    (`bind_evidence`), so one executable serves every batch and budget.
    """

    def plan(self, stats, ctx):
        value = budgets.budget_value(self.budget)
        if not isinstance(value, tuple):
            raise ValueError("oracle evidence needs each row's evidence tokens: bind them with "
                             "references.bind_evidence (the evaluation harness does)")
        ratio, evidence = value  # [B, P] bool over each row's visual tokens in order
        ordinal = jnp.clip(jnp.cumsum(ctx.is_visual, axis=-1) - 1, 0, evidence.shape[-1] - 1)
        first = ctx.is_visual & jnp.take_along_axis(evidence, ordinal, axis=-1)
        return self.plan_ranked(stats, ctx, ratio, first)


def evidence_mask(patches, num_visual: int) -> np.ndarray:
    """[B, num_visual] bool: row i's visual tokens `patches[i]` (visual ordinals, `harness.answer_patches`)."""
    mask = np.zeros((len(patches), num_visual), bool)
    for i, p in enumerate(patches):
        mask[i, np.asarray(p, int)] = True
    return mask


def bind_evidence(budget_value, evidence: np.ndarray):
    """The traced budget of `OracleEvidence` (`methods.split_budget`'s value) with the batch's evidence
    [B, P] bool riding along: what its `plan` reads."""
    return budget_value, jnp.asarray(evidence)


@dataclasses.dataclass(frozen=True)
class PooledVisual(Method):
    """Every real text token, plus the visual KV average-pooled over `pool` x `pool` blocks of the
    image's G x G token grid (blocks at the grid's right and bottom edges hold what is left): each
    block's keys and values, per layer and kv head, are averaged into its top-left token's slot, which
    alone is kept (its position stays the top-left token's). One share per `pool`: the budget is
    the pooling, none is taken.

    Needs one square grid of visual tokens per row (LLaVA-1.5-style towers; the testbeds).
    capacity(S, Nv) = S - Nv + ceil(G / pool)^2.
    """

    pool: int = 2

    def observe(self, q, k, ctx):
        return heads_marker(k)

    def blocks(self, ctx):
        """(block [B, S] int32 of each visual slot (0 elsewhere), top-left [B, S] bool, blocks per row)."""
        side = math.isqrt(ctx.num_visual or 0)
        if not ctx.num_visual or side * side != ctx.num_visual:
            raise ValueError(f"pooled visual needs one square grid of visual tokens per row, got "
                             f"{ctx.num_visual} visual tokens")
        per_side = -(-side // self.pool)
        ordinal = jnp.cumsum(ctx.is_visual, axis=-1) - 1
        row, col = ordinal // side, ordinal % side
        block = jnp.where(ctx.is_visual, (row // self.pool) * per_side + col // self.pool, 0)
        top_left = ctx.is_visual & (row % self.pool == 0) & (col % self.pool == 0)
        return block, top_left, per_side * per_side

    def merge_kv(self, k, v, ctx):
        block, top_left, n = self.blocks(ctx)
        member = jax.nn.one_hot(block, n, dtype=jnp.float32) * ctx.is_visual[..., None]  # [B, S, n]
        weight = member / jnp.maximum(member.sum(1, keepdims=True), 1.0)

        def pooled(x):  # [L, B, H, S, D]: each block's mean written into its top-left slot
            mean = jnp.einsum("bsn,lbhsd->lbhnd", weight, x.astype(jnp.float32))
            spread = jnp.einsum("bsn,lbhnd->lbhsd", member, mean)
            return jnp.where(top_left[None, :, None, :, None], spread.astype(x.dtype), x)

        return pooled(k), pooled(v)

    def plan(self, stats, ctx):
        L, B, H = stats.shape
        S = ctx.valid.shape[-1]
        _, top_left, _ = self.blocks(ctx)
        keep = jnp.broadcast_to(((ctx.valid & ~ctx.is_visual) | top_left)[None, :, None], (L, B, H, S))
        idx, cnt = select_topk(keep.astype(jnp.float32), keep.sum(-1), self.capacity(S, ctx.num_visual), keep, keep)
        return KeepPlan(indices=idx, count=cnt)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        side = math.isqrt(num_visual)
        return prompt_len - num_visual + (-(-side // self.pool)) ** 2


POOLS = (2, 3, 4, 6, 8)
REFERENCES = ("text only", "recency only", "text + random visual", "oracle evidence",
              *(f"pooled visual {p}x{p}" for p in POOLS))
FIXED_SHARE = ("text only", *(f"pooled visual {p}x{p}" for p in POOLS))  # no budget: one share each


def reference_method(name: str, budget: float | None = 0.1):
    """The method object of a reference row ("text only" and the pooled rows take no budget)."""
    if name == "text only":
        return TextAndRandomVisual(budget=1.0, with_visual=False)
    if name == "recency only":
        return build(Compression("streamingllm", budget=budget, n_sink=0))
    if name == "text + random visual":
        return TextAndRandomVisual(budget=budget)
    if name == "oracle evidence":
        return OracleEvidence(budget=budget)
    for p in POOLS:
        if name == f"pooled visual {p}x{p}":
            return PooledVisual(pool=p)
    raise ValueError(f"unknown reference row {name!r}; expected one of {', '.join(REFERENCES)}")
