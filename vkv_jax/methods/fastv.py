"""FastV (arXiv 2403.06764): drop the least-attended visual tokens from the sequence after layer K-1.

The released code (github.com/pkunlp-icler/FastV) ranks the image tokens by layer K-1's
attention from the last prompt token, averaged over heads, keeps the top round(N (1 - R)) (plus every
text token) in their original order, and runs layers K.. on that shorter sequence at the kept tokens'
original positions (`position_ids = keep_indexs`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import budgets
from vkv_jax.methods.base import KeepsPrefillCache, PrefillContext, Reduction, Stage
from vkv_jax.methods.options import BUDGET, POSITIVE_INT, check_fields, option


def last_token_attention(q: jax.Array, k: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, S] float32: the last slot's softmax attention over the valid keys, averaged over query heads.

    q [B, Hq, S, Dh], k [B, Hkv, S, Dh] post-RoPE. Rows are left-padded, so slot S-1 is every row's last
    prompt token and its causal row sees every key.
    """
    B, Hq, S, Dh = q.shape
    Hkv = k.shape[1]
    qg = q[:, :, -1].reshape(B, Hkv, Hq // Hkv, Dh)
    logits = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=jnp.float32) * Dh ** -0.5
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1).mean(axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class FastV(KeepsPrefillCache):
    """Visual-token pruning inside the prefill (no post-prefill eviction).

    budget: visual tokens kept from layer k on: a ratio of the visual tokens (1 - R; default 0.5, the
            paper's R = 50%; kept = round(N * budget) as the code rounds) or an absolute count.
    k:      the first pruned layer (default 2); the ranking uses layer k-1's attention. 1 <= k < L.
    The budget stays static (one compile per budget): it sets the sequence length after layer k.
    Several images / anyres tiles: all of a row's visual tokens (every image, base crops, tiles and
    newline tokens) are ranked together. Rows with different visual counts N_b (images of different
    sizes) each keep their own round(N_b * budget), exactly as each row alone; the sequence after layer
    k is as long as the row that drops the fewest needs, the others' extra slots dead.
    """

    budget: float | int = option(0.5, BUDGET)
    k: int = option(2, POSITIVE_INT)  # a layer index; below the model's depth is checked by `schedule`
    ragged_visual = True  # reduce keeps each row's own count (`methods.base`)

    def __post_init__(self):
        check_fields(self)

    def kept(self, num_visual: int) -> int:
        if not num_visual:  # a text-only row keeps its (empty) visual span
            return 0
        if budgets.is_ratio(self.budget):
            return max(1, round(num_visual * float(self.budget)))
        return min(num_visual, int(self.budget))

    def schedule(self, num_layers: int, num_visual: int) -> Reduction:
        if self.k >= num_layers:
            raise ValueError(f"fastv k={self.k} must be below the number of layers ({num_layers})")
        # kept() never drops fewer tokens from a longer span, so the row with the fewest visual tokens
        # drops the fewest: Stage.num_visual (its count after) also sets the static sequence length
        return Reduction((Stage(layer=self.k - 1, num_visual=self.kept(num_visual)),), reindex_positions=False)

    def reduce(self, stage: Stage, x, q, k, ctx: PrefillContext):
        att = last_token_attention(q, k, ctx.valid)
        score = jnp.where(ctx.is_visual, att, -jnp.inf)
        S = x.shape[1]
        # each row's kept count from its own visual count, through a host table of kept() (the same
        # rounding as a batch of one, no float32 re-derivation); top_k wide enough for the longest row
        table = np.array([min(n, self.kept(n)) for n in range(S + 1)], np.int32)
        kept = jnp.asarray(table)[ctx.is_visual.sum(axis=1)]  # [B]
        _, top = jax.lax.top_k(score, int(table.max()))  # [B, K] best first, ties to the lower slot
        top = jnp.where(jnp.arange(top.shape[1]) < kept[:, None], top, S)  # past S: dropped by the scatter
        keep = (~ctx.is_visual).at[jnp.arange(x.shape[0])[:, None], top].set(True, mode="drop")
        return x, keep
