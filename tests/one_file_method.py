"""A compression method in one file that only defines its scores (the method contract's test subject):
keep the keys of largest norm, scored from the keys alone. A test registers it as NAME for as long as it needs
it (`register(NAME, KeyNorm)`), so the other tests see only the built-in methods."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vkv_jax.methods import ScorerMethod

NAME = "keynorm"


@dataclasses.dataclass(frozen=True)
class KeyNorm(ScorerMethod):
    """Keep each (layer, row, kv head)'s budget_count(budget, prompt length) keys of largest L2 norm."""

    budget: float | int = 0.1
    observation_window = 0  # the scores read no queries

    def score(self, q, k, ctx):
        return jnp.linalg.norm(k.astype(jnp.float32), axis=-1)  # [B, Hkv, S]

