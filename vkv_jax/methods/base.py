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
slots after each (`decode.run_prompt`); their `plan` returns None.

A chunked prefill (`decode.chunked_prompt`) never holds every query row of a layer at once. A scoring
method works there through one of two optional hooks (`chunk_observer` says which):

  observe_rows(S, ctx) -> int          static: `observe` reads only the queries of the last n slots
                                       (an observation window), so the prefill keeps those rows of every
                                       layer and calls `observe(q_last_n, k, ctx)` once the keys are in
  observe_chunk(q, k, lse, ctx) -> stats   stats that add up over query rows (H2O's column sums): called
                                       per chunk with its rows' queries and log-sum-exp, summed over chunks

Either way the stats equal the one-shot prefill's: a causal row's softmax is complete inside its chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

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


class Method(Protocol):
    budget: Any

    def observe(self, q: jax.Array, k: jax.Array, ctx: PrefillContext) -> Any: ...

    def plan(self, stats: Any, ctx: PrefillContext) -> KeepPlan: ...

    def capacity(self, prompt_len: int, num_visual: int) -> int: ...



@runtime_checkable
class PrefillReducer(Protocol):
    """What an in-prefill method (FastV, LightKV) adds to `Method`: it shortens the visual span between
    layers of the prefill. `isinstance(method, PrefillReducer)` tells the decode path to run it
    (`reduction_schedule`). A `ragged_visual` attribute, True when `reduce` handles rows of different
    visual counts, is optional (default False: `api` then requires equal counts)."""

    def schedule(self, num_layers: int, num_visual: int) -> Reduction | None:
        """The static stages for this layer count and visual-token count (None: no reduction)."""

    def reduce(self, stage: Stage, x: jax.Array, q: jax.Array, k: jax.Array,
               ctx: PrefillContext) -> tuple[jax.Array, jax.Array]:
        """x [B, S, D] the output of layer `stage.layer`; q [B, Hq, S, Dh], k [B, Hkv, S, Dh] that layer's
        post-RoPE projections; ctx the current sequence (ctx.num_visual: the fewest visual tokens of any
        row; `ctx.is_visual` says which slots each row's are). Returns x [B, S, D] with merged values
        written into surviving slots, and keep [B, S] bool: every non-visual slot and each row's kept
        visual slots (`stage.min_dropped` at least are dropped in every row)."""


def reduction_schedule(method: Method, num_layers: int, num_visual: int) -> Reduction | None:
    """The method's static in-prefill schedule, or None (not a `PrefillReducer`, no visual tokens, or no
    stage left)."""
    if not isinstance(method, PrefillReducer) or not num_visual:
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


def chunk_observer(method: Method) -> str | None:
    """How `method` observes a chunked prefill: "none" (it keeps the prefill cache unscored: `full`),
    "rows" (`observe_rows`: a static window of trailing query rows), "chunk" (`observe_chunk`: stats
    summed over chunks), or None (a scorer with neither hook). In-prefill reductions are the caller's
    check (`reduction_schedule`): they need a layer's whole sequence between their stages."""
    if type(method).observe is KeepsPrefillCache.observe:
        return "none"
    if getattr(method, "observe_chunk", None) is not None:
        return "chunk"
    if getattr(method, "observe_rows", None) is not None:
        return "rows"
    return None


class KeepsPrefillCache:
    """observe / plan / capacity of a method that evicts nothing after prefill (full cache, and the
    in-prefill reductions, whose shortened layers are already what decoding reads)."""

    def observe(self, q, k, ctx):
        return ()

    def plan(self, stats, ctx):
        return None

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return prompt_len


@dataclasses.dataclass(frozen=True)
class Full(KeepsPrefillCache):
    """No compression: the decode cache holds every prompt slot."""

    budget: Any = None
