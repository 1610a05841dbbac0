"""AdaKV (arXiv 2407.11550): one layer budget shared across kv heads by score, over any base scorer.

On a device mesh (`vkv_jax.load(..., mesh=...)`) the flattened top-k over all kv heads of a layer is computed
by this same global-view code: `jit` (GSPMD) reduces over the `model` (kv heads) and `data` (rows) shards
where the scores are split, so its per-head counts equal the one-device ones (tests/test_sharding.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from vkv_jax.methods._common import Selection, TopKPlan
from vkv_jax.methods.options import BUDGET, FRACTION, check_fields, option
from vkv_jax.methods.registry import available, factory
from vkv_jax.selection import selection_keys

_SAFE = jnp.finfo(jnp.float32).max  # below +inf (protected), above every real score


def adaptive_head_counts(sel: Selection, alpha_safeguard: float) -> Selection:
    """Redistribute each (layer, row)'s total sum_h count over kv heads by a flattened top-k.

    Every head first keeps its protected slots plus its top floor(alpha * count_h) scores (the
    safeguard); the rest of the layer's total goes to the highest remaining scores of any head
    (ties: lower head, then lower slot). Returns a Selection with per-head counts and keys such that
    a per-head top-k reproduces exactly the flattened choice.
    """
    L, B, H, S = sel.scores.shape
    key = selection_keys(sel.scores, sel.protected, sel.allowed)  # [L, B, H, S]
    n_prot = (sel.protected & sel.allowed).sum(-1)
    n_safe = jnp.floor(alpha_safeguard * sel.counts.astype(jnp.float32) + 1e-6).astype(jnp.int32)
    order = jnp.argsort(-key, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    safe = (rank < (n_prot + n_safe)[..., None]) & sel.allowed & ~sel.protected
    key = jnp.where(safe, _SAFE, key)
    flat = key.reshape(L, B, H * S)
    frank = jnp.argsort(jnp.argsort(-flat, axis=-1, stable=True), axis=-1, stable=True)
    total = jnp.maximum(sel.counts, n_prot).sum(-1)  # [L, B]
    chosen = (frank < total[..., None]).reshape(L, B, H, S) & sel.allowed
    counts = chosen.sum(-1).astype(jnp.int32)
    return Selection(key, counts, sel.protected & sel.allowed, sel.allowed)


@dataclasses.dataclass(frozen=True)
class AdaKV(TopKPlan):
    """Head-adaptive budgets over a base scorer: `base` is a `TopKPlan` scorer object (e.g.
    `SnapKV(window=16)`), or the registered name of one ('snapkv', 'pyramidkv', 'h2o', 'vlcache'; built
    with `base_options`). Either way the base runs with AdaKV's `budget`, and every hook of the method
    contract that the base answers (observation, chunked observation, traced budget, protected window)
    is the base's.

    budget: passed to the base (its convention: e.g. SnapKV's ratio of the prompt per layer and head);
            the layer total sum_h C_h is preserved and redistributed.
    alpha_safeguard: 0.2 (kvpress default; AdaKV's GQA setting `floor_alpha`).
    capacity(S, Nv) = S: one head may take most of its layer's budget; the paged pool reserves the layer
    totals (`total_capacity`), not S per head.
    The budget is traced (one executable for many budgets) when the base method's is.
    Several images / anyres tiles: as its base method treats them.
    """

    budget: float | int = option(0.1, BUDGET)
    base: TopKPlan | str = "snapkv"
    alpha_safeguard: float = option(0.2, FRACTION)
    base_options: Any = ()

    def __post_init__(self):
        check_fields(self)
        if isinstance(self.base_options, dict):
            object.__setattr__(self, "base_options", tuple(sorted(self.base_options.items())))
        if not isinstance(self.base, str) and not dataclasses.is_dataclass(self.base):
            raise TypeError(f"adakv base must be a scorer method's name or a method object, got {self.base!r}")
        if not isinstance(self.base, str) and self.base_options:
            raise ValueError("adakv base_options apply to a base given by name; set them on the base object")
        if not issubclass(self._base_class, TopKPlan) or issubclass(self._base_class, AdaKV):
            raise ValueError(f"adakv base {self.base!r} is not a scorer method (a TopKPlan: one with `selection`)")
        self.base_method  # noqa: B018  (a bad base option fails here, at construction)

    @property
    def _base_class(self) -> type:
        if not isinstance(self.base, str):
            return type(self.base)
        if self.base not in available() or self.base == "adakv":
            raise ValueError(f"adakv base must be a registered scorer method, got {self.base!r}")
        return factory(self.base)

    @property
    def base_method(self) -> TopKPlan:
        """The base scorer with AdaKV's budget."""
        if not isinstance(self.base, str):
            return dataclasses.replace(self.base, budget=self.budget)
        return self._base_class(budget=self.budget, **dict(self.base_options))

    @property
    def traced_budget(self) -> str | None:
        """The base's kind: the budget is traced when the base's is, and a base whose capacity follows its
        count ("count") gets its capacity bucket, which bounds the page pool (`total_capacity`)."""
        return self._base_class.traced_budget

    def observe(self, q, k, ctx, lse=None):
        return self.base_method.observe(q, k, ctx)

    def chunk_observer(self) -> str | None:
        return self.base_method.chunk_observer()

    def observe_rows(self, prompt_len: int, ctx) -> int:
        return self.base_method.observe_rows(prompt_len, ctx)

    def observe_chunk(self, q, k, lse, key_valid):
        return self.base_method.observe_chunk(q, k, lse, key_valid)

    def protected_window(self) -> int | None:
        return self.base_method.protected_window()

    def lowest_ratio(self) -> float | None:
        return self.base_method.lowest_ratio()

    def selection(self, stats, ctx) -> Selection:
        return adaptive_head_counts(self.base_method.selection(stats, ctx), self.alpha_safeguard)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        return prompt_len

    def total_capacity(self, prompt_len: int, num_visual: int, num_layers: int, num_kv_heads: int) -> int:
        """Static bound on the slots kept over all layers and kv heads of one row (sizes the page pool):
        the base's total, redistributed over heads, never grown (a base's protected slots lie inside its counts)."""
        total = self.base_method.total_capacity(prompt_len, num_visual, num_layers, num_kv_heads)
        return min(num_layers * num_kv_heads * prompt_len, total)
