"""The method interface: what prefill hands a compression method, and what it hands back.

A method is a frozen dataclass (hyper-parameters + `budget`), hashable so it can be a static jit
argument. Its pure functions run inside the same jit as prefill:

  observe(q, k, ctx) -> stats        once per layer, inside the prefill layer scan (stats get a leading L)
  plan(stats, ctx)   -> KeepPlan     after the last layer: budgets + selection for every layer
  capacity(S, Nv)    -> int          static upper bound on the slots kept in any layer (sizes the cache)

`cache.compact(cache, plan, capacity)` turns a plan into storage; methods never touch the layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp


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


class Method(Protocol):
    budget: Any

    def observe(self, q: jax.Array, k: jax.Array, ctx: PrefillContext) -> Any: ...

    def plan(self, stats: Any, ctx: PrefillContext) -> KeepPlan: ...

    def capacity(self, prompt_len: int, num_visual: int) -> int: ...


@dataclasses.dataclass(frozen=True)
class Full:
    """No compression: the decode cache holds every prompt slot."""

    budget: Any = None

    def observe(self, q, k, ctx):
        return ()

    def plan(self, stats, ctx):
        return None

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return prompt_len
