"""The method interface: what prefill hands a compression method, and what it hands back.

A method is a frozen dataclass (hyper-parameters + `budget`), hashable so it can be a static jit
argument. Its pure functions run inside the same jit as prefill:

  observe(q, k, ctx) -> stats        once per layer, inside the prefill layer scan (stats get a leading L)
  plan(stats, ctx)   -> KeepPlan     after the last layer: budgets + selection for every layer
  capacity(S, Nv)    -> int          static upper bound on the slots kept in any layer (sizes the cache)

`cache.compact(cache, plan, capacity)` turns a plan into storage; methods never touch the layout.

In-prefill methods (LightKV, FastV) shorten the sequence that later layers process instead, through an
optional hook of two more functions:

  schedule(L, Nv)               -> Reduction | None   static: after which layers, how many visual tokens remain
  reduce(stage, x, q, k, ctx)   -> (x, keep)          after `stage.layer`: merged hidden states + survivors

The decoder scans the layers in segments between the stages and compacts the sequence to the `keep`
slots after each (`prefill.run_prompt`); their `plan` returns None.

A chunked prefill (`prefill.chunked_prompt`) never holds every query row of a layer at once. A scoring
method works there through one of two optional hooks (`chunk_observer` says which):

  observe_rows(S, ctx) -> int          static: `observe` reads only the queries of the last n slots
                                       (an observation window), so the prefill keeps those rows of every
                                       layer and calls `observe(q_last_n, k, ctx)` once the keys are in
  observe_chunk(q, k, lse, key_valid)  stats per key slot that add up over query rows (H2O's column
                                       sums): called per chunk with its rows' queries, the keys it sees and
                                       its log-sum-exp; moved to the prompt's slots and summed over chunks

Either way the stats equal the one-shot prefill's: a causal row's softmax is complete inside its chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.struct
import jax


@flax.struct.dataclass
class PrefillContext:
    """Per-prompt facts every method may read. All traced; shapes static per length bucket.

    tags:      [B, S] int8   0 text, 1 vision (padding slots are 0 with valid False)
    positions: [B, S] int32  original position of each slot, -1 on left padding
    valid:     [B, S] bool   False on left padding
    num_visual: static int or None, visual tokens per row (same for all rows). Optional: methods
               that score only the rows after the image (VL-Cache, AirCache) use it to bound their
               query-row window statically to the last max(S - num_visual, 50) slots; None = all S rows.
    """

    tags: jax.Array
    positions: jax.Array
    valid: jax.Array
    num_visual: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def is_visual(self) -> jax.Array:
        return (self.tags == 1) & self.valid


@flax.struct.dataclass
class KeepPlan:
    """Which prompt slots each layer / row / kv head keeps.

    indices: [L, B, Hkv, K] int32 slot indices into the prefill cache, ascending in [0, count);
             entries at rank >= count are padding (any in-range value) and are ignored.
    count:   [L, B, Hkv] int32 number of kept slots (<= K).
    """

    indices: jax.Array
    count: jax.Array


@dataclasses.dataclass(frozen=True)
class Stage:
    """One in-prefill reduction, all static.

    layer:      0-based decoder layer after which the visual span is shortened
    num_visual: visual tokens per row after the stage (rows that differ: the fewest of any row)
    arg:        the method's own static data for this stage (LightKV: (windows per side, ratio))
    dropped:    slots every row loses at least (the next segment is this much shorter; a row that loses
                more is left-padded with dead slots). None: the row with the fewest visual tokens loses
                the fewest (FastV's share), i.e. the static count before the stage minus `num_visual`.
    """

    layer: int
    num_visual: int
    arg: Any = None
    dropped: int | None = None

    def min_dropped(self, num_visual_before: int) -> int:
        """Slots every row loses at this stage, given the static count `num_visual_before` entering it."""
        return num_visual_before - self.num_visual if self.dropped is None else self.dropped


@dataclasses.dataclass(frozen=True)
class Reduction:
    """An in-prefill method's static schedule.

    stages: in increasing layer order, each before the last layer.
    reindex_positions: RoPE positions of the layers after a stage. False: every token keeps its original
      position (FastV). True: the shortened row is re-indexed 0..n-1 (LightKV's released code).
      Decoding continues from the original prompt length in every layer either way.
    """

    stages: tuple[Stage, ...]
    reindex_positions: bool = False


class Method:
    """The method contract: every hook the library calls, with its default. A method is a frozen dataclass
    that subclasses this (directly, or through `TopKPlan` / `KeepsPrefillCache`) and overrides what it needs;
    nothing outside this class asks a method what it can do in any other way.

    Post-prefill scoring (every layer observed, one keep-plan at the end):
      observe, plan, capacity            the core three (a scorer over every slot: `methods._common.TopKPlan`,
                                         whose plan is the top-k of its `selection`)
      observe_lse                        whether `observe` also wants the attention's log-sum-exp (H2O)
      total_capacity                     a tighter bound on one row's slots over all layers and heads
      traced_budget                      whether one executable may serve many budgets (`split_budget`)
      merge_kv                           rewrites the prefill K/V before the plan's slots are gathered
                                         (the pooled-visual reference row averages blocks into one slot)
    Chunked prefill (`prefill.chunked_prompt`): `chunk_observer` says how, through `observe_rows` (a
    static window of trailing query rows) or `observe_chunk` (stats that add up over query rows).
    In-prefill reduction (FastV, LightKV): `schedule` + `reduce` (+ `ragged_visual`, `with_grids`).
    Questions the evaluation asks: `protected_window`, `lowest_ratio`.
    """

    budget: Any = None
    # "none": capacity independent of the budget (the budget is traced, the key holds its kind only);
    # "count": capacity monotone in the kept count (traced, keyed by the count's power-of-two bucket);
    # None: the budget stays static (one executable per budget).
    traced_budget: ClassVar[str | None] = None
    # an in-prefill reduction whose `reduce` keeps each row's own count when rows differ in visual tokens
    ragged_visual: ClassVar[bool] = False

    def observe(self, q: jax.Array, k: jax.Array, ctx: PrefillContext, lse: jax.Array | None = None) -> Any:
        """Per-layer statistics, inside the prefill's layer scan (the results get a leading L).
        q [B, Hq, T, Dh] the queries of the last T slots (T = S one-shot; `observe_rows` in a chunked
        prefill), k [B, Hkv, S, Dh] post-RoPE; lse [B, Hq, T] f32 when `observe_lse`. Default: nothing."""
        return ()

    @property
    def observe_lse(self) -> bool:
        """Whether `observe` wants the prefill attention's log-sum-exp (`lse=`)."""
        return False

    def plan(self, stats: Any, ctx: PrefillContext) -> KeepPlan | None:
        """The keep-plan of every layer from the stacked statistics; None keeps the prefill cache."""
        return None

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        """Static upper bound on the slots one (layer, row, kv head) keeps (sizes the compacted cache)."""
        return prompt_len

    def merge_kv(self, k: jax.Array, v: jax.Array, ctx: PrefillContext) -> tuple[jax.Array, jax.Array]:
        """The prefill's k, v [L, B, Hkv, S, Dh] as the plan's kept slots should hold them (a merging method
        writes merged values into the slots it keeps). Default: unchanged."""
        return k, v

    def total_capacity(self, prompt_len: int, num_visual: int, num_layers: int, num_kv_heads: int) -> int:
        """Static bound on the slots one row keeps over all layers and kv heads (sizes a static page pool).
        Default: every (layer, head) at `capacity`; adaptive methods that move a fixed total between layers
        or heads bound it tighter."""
        return num_layers * num_kv_heads * self.capacity(prompt_len, num_visual)

    def chunk_observer(self) -> str | None:
        """How this method observes a chunked prefill: "chunk" (`observe_chunk` overridden), "rows"
        (`observe_rows` overridden), "none" (it scores nothing: `KeepsPrefillCache`) or None (it cannot)."""
        if type(self).observe_chunk is not Method.observe_chunk:
            return "chunk"
        if type(self).observe_rows is not Method.observe_rows:
            return "rows"
        return None

    def observe_rows(self, prompt_len: int, ctx: PrefillContext) -> int:
        """Static: `observe` reads only the queries of the last n slots (an observation window), so a
        chunked prefill keeps those rows of every layer and observes once every key is in."""
        raise NotImplementedError(f"{type(self).__name__} has no observation window")

    def observe_chunk(self, q: jax.Array, k: jax.Array, lse: jax.Array, key_valid: jax.Array) -> jax.Array:
        """Stats that add up over query rows (H2O's column sums): one chunk's share [B, Hkv, C] per key slot,
        q [B, Hq, T, Dh] the chunk's queries at the last T of the C slots of k [B, Hkv, C, Dh], lse
        [B, Hq, T] f32 their attention's log-sum-exp, key_valid [B, C] the real keys. The prefill moves
        the shares to the prompt's slots and sums them (`llama.prefill_layers_chunked`)."""
        raise NotImplementedError(f"{type(self).__name__} has no chunk-additive statistics")

    @property
    def reduces_in_prefill(self) -> bool:
        """Whether this method shortens the sequence inside the prefill (it overrides `schedule`), so a
        chunked prefill cannot run it."""
        return type(self).schedule is not Method.schedule

    def schedule(self, num_layers: int, num_visual: int) -> Reduction | None:
        """An in-prefill reduction's static stages for this depth and visual count; None: no reduction."""
        return None

    def reduce(self, stage: Stage, x: jax.Array, q: jax.Array, k: jax.Array,
               ctx: PrefillContext) -> tuple[jax.Array, jax.Array]:
        """x [B, S, D] the output of layer `stage.layer`; q [B, Hq, S, Dh], k [B, Hkv, S, Dh] that layer's
        post-RoPE projections; ctx the current sequence (ctx.num_visual: the fewest visual tokens of any
        row; `ctx.is_visual` says which slots each row's are). Returns x [B, S, D] with merged values
        written into surviving slots, and keep [B, S] bool: every non-visual slot and each row's kept
        visual slots (`stage.min_dropped` at least are dropped in every row)."""
        raise NotImplementedError(f"{type(self).__name__} has no in-prefill reduction")

    def with_grids(self, grids: tuple, visual_tokens: Sequence[int] | None = None) -> Method:
        """The method bound to a batch's image grids (per row: each image's regions in visual ordinals,
        `models.anyres.row_regions`) and visual counts; a method that does not window over grids (all
        but LightKV) is returned as it is."""
        return self

    def protected_window(self) -> int | None:
        """The fixed number of trailing prompt tokens this method always keeps (SnapKV's observation
        window), which the evaluation marks as "= recency" when a budget keeps nothing else; else None."""
        return None

    def lowest_ratio(self) -> float | None:
        """The smallest ratio budget this method accepts (the evaluation's budget search starts there);
        None for a method that takes no budget."""
        return None if self.budget is None else 0.005


def reduction_schedule(method: Method, num_layers: int, num_visual: int,
                       any_visual: bool = False) -> Reduction | None:
    """The method's static in-prefill schedule, or None (no reduction, no visual tokens, or no stage left),
    checked: stages after increasing layers below the last one.

    num_visual: the static visual count (the fewest of any row); any_visual: some row holds visual tokens.
    A method that reduces each row by its own count (`ragged_visual`) still reduces the rows with images
    when the fewest is 0 (a text-only row in the batch keeps its sequence; the others reduce as alone)."""
    if not num_visual and not (any_visual and method.ragged_visual):
        return None
    reduction = method.schedule(num_layers, num_visual)
    if reduction is None or not reduction.stages:
        return None
    layers = [s.layer for s in reduction.stages]
    if layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers - 1:
        raise ValueError(f"in-prefill stages must follow increasing layers below the last one "
                         f"({num_layers - 1}), got {layers}")
    return reduction


def visual_per_layer(reduction: Reduction | None, num_layers: int, num_visual: int) -> tuple[int, ...]:
    """Static visual tokens per row entering each layer (and so held in its cache)."""
    counts, n = [], num_visual
    stages = {s.layer: s.num_visual for s in (reduction.stages if reduction else ())}
    for layer in range(num_layers):
        counts.append(n)
        n = stages.get(layer, n)
    return tuple(counts)


class KeepsPrefillCache(Method):
    """A method that evicts nothing after prefill (full cache, and the in-prefill reductions, whose
    shortened layers are already what decoding reads): the base's observe / plan / capacity, and a
    chunked prefill needs no observation."""

    def chunk_observer(self) -> str | None:
        return "none"


@dataclasses.dataclass(frozen=True)
class Full(KeepsPrefillCache):
    """No compression: the decode cache holds every prompt slot."""

    budget: Any = None
