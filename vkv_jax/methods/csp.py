"""Cross-Self Pruning (Pei et al., arXiv 2412.04652): modality-split window scores with n-softmax.

Defaults follow the official code (github.com/TerryPei/CSP) where it and the paper differ, with the paper's
variants as options; GQA, which that code does not handle, sums the scores over each kv group.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from vkv_jax import budgets
from vkv_jax.methods import scoring
from vkv_jax.methods._common import (
    broadcast_lbhs,
    check_observe,
    last_rows,
    num_valid,
    recent_window,
    tail_mask,
)
from vkv_jax.methods.base import KeepPlan, Method
from vkv_jax.methods.options import BUDGET, FRACTION, IMPL, SHARE, Rule, check_fields, option
from vkv_jax.pallas_kernels import window_scores
from vkv_jax.selection import PAD_INDEX, keep_mask, select_topk

COMBINES = ("concat", "union_dedup", "and")


def csp_layer_scores(q_win, k, valid, is_img, rows, n: float = 1.0, impl: str = "auto"):
    """Self / cross scores of one layer, as the official code computes them (window logits, n-softmax,
    modality split, sums over the window rows).

    q_win [B, Hq, W, D] last-W-slot queries; k [B, Hkv, S, D]; valid, is_img [B, S]; rows [B, W]
    which window slots are observation queries. n-softmax over every visible real key (n = 0:
    softmax); a key's score is split by whether its modality equals the query row's. Returns
    (s_self, s_cross) float32 [B, Hkv, S], summed over rows and each GQA group (no head averaging).
    """
    W = q_win.shape[2]
    key_group = is_img.astype(jnp.int32)
    ws = window_scores(q_win, k, scoring.query_slots(valid, W, rows), valid,
                       q_group=key_group[:, scoring.row_slots(k.shape[2], W)], key_group=key_group,
                       n_softmax=n if n > 0 else None, impl=impl)
    return ws.colsum_same, ws.colsum_cross


@dataclasses.dataclass(frozen=True)
class CSP(Method):
    """Cross-Self Pruning, per layer and kv head.

    budget: ratio of the row's prompt tokens (default 0.2 = code's hh_ratio 0.1 + recent_ratio 0.1),
            or an absolute count; kept = k_self + k_cross + R per layer and head. With a ratio,
            hh = floor(L (budget - recent_ratio)); with a count C, hh = C - O.
    recent_ratio: 0.1, O = floor(L * recent_ratio) observation queries.
    kv_recent_bias: 1.0, R = O (else floor(O * bias)) most recent keys always kept.
    cross_ratio: 0.5; Kp = hh + O - R, k_cross = floor(Kp cr), k_self = floor(Kp (1 - cr));
            cross_ratio <= 0 gives (k_cross, k_self) = (1, Kp - 1) (code quirk, generalised).
    n: 1.0 (n-softmax used for scoring only; decode attention is ordinary softmax).
    combine: 'concat' (code: both selections kept, a key chosen twice is stored twice — default),
            'union_dedup' (cross top-k skips keys already chosen by self, so the count is unchanged
            with no duplicates), 'and' (paper Eq. 3 literally: keys in both selections, + recent).
    impl: 'auto' | 'kernel' | 'reference' for the `window_scores` call (auto: kernel on TPU only).
    Rows without any image keep everything (the code does not prune text-only prompts).
    capacity(S, Nv) = S if Nv == 0, else min(S, max(hh + O, R) + 1) for an S-token row. The budget
    stays static (one compile per budget): the capacity and the ratio-vs-recent_ratio check need it.
    Several images / anyres tiles: "cross" is every visual key of the row (all images, tiles and newline
    tokens, by modality tag), "self" every text key, wherever they sit in the prompt.
    """

    budget: float | int = option(0.2, BUDGET)
    recent_ratio: float = option(0.1, SHARE)
    kv_recent_bias: float = option(1.0, Rule("float", lo=0.0))
    cross_ratio: float = option(0.5, FRACTION)
    n: float = option(1.0, Rule("float", lo=0.0))
    combine: str = option("concat", Rule("choice", choices=COMBINES))
    impl: str = option("auto", IMPL)

    def __post_init__(self):
        check_fields(self)
        if budgets.is_ratio(self.budget) and float(self.budget) < self.recent_ratio:
            raise ValueError(f"csp budget {self.budget} must be >= recent_ratio {self.recent_ratio}")

    # ---- sizes (traced per row, mirrored statically in `capacity`)
    def _sizes(self, Lr):
        """Lr [B] int32 row lengths -> dict of int32 [B]: O, hh, R, k_self, k_cross."""
        Lf = Lr.astype(jnp.float32)
        O = recent_window(Lr, of_prompt=self.recent_ratio, prompt_len=Lr)  # the observation window
        if budgets.is_ratio(self.budget):
            hh = jnp.floor(Lf * (float(self.budget) - self.recent_ratio) + 1e-6).astype(jnp.int32)
        else:
            hh = jnp.maximum(jnp.minimum(self.budget, Lr) - O, 0)
        R = O if self.kv_recent_bias == 1 else jnp.floor(O * self.kv_recent_bias + 1e-6).astype(jnp.int32)
        R = jnp.minimum(R, Lr)
        kp = jnp.maximum(hh + O - R, 0)
        if self.cross_ratio <= 0:
            k_cross, k_self = jnp.minimum(kp, 1), jnp.maximum(kp - 1, 0)
        else:
            kpf = kp.astype(jnp.float32)
            k_cross = jnp.floor(kpf * self.cross_ratio + 1e-6).astype(jnp.int32)
            k_self = jnp.floor(kpf * (1.0 - self.cross_ratio) + 1e-6).astype(jnp.int32)
        return dict(O=O, hh=hh, R=R, k_self=k_self, k_cross=k_cross)

    def observe(self, q, k, ctx):
        check_observe(q, k, ctx)
        S = k.shape[2]
        W = self.observe_rows(S, ctx)
        O = self._sizes(num_valid(ctx))["O"]
        slots = scoring.row_slots(S, W)
        rows = ctx.valid[:, slots] & (slots[None] >= S - O[:, None])
        s_self, s_cross = csp_layer_scores(last_rows(q, W), k, ctx.valid, ctx.is_visual, rows, self.n,
                                           self.impl)
        return {"self": s_self, "cross": s_cross}

    def lowest_ratio(self) -> float:
        """A ratio budget must hold the observation window: at least `recent_ratio`."""
        return float(self.recent_ratio)

    def observe_rows(self, prompt_len: int, ctx) -> int:
        """Static number of trailing query rows `observe` reads (a chunked prefill keeps only these):
        the widest row's O = floor(S * recent_ratio) observation queries."""
        return max(1, min(prompt_len, int(math.floor(prompt_len * self.recent_ratio + 1e-6))))

    def plan(self, stats, ctx):
        s_self, s_cross = stats["self"], stats["cross"]
        L, B, H, S = s_self.shape
        K = self.capacity(S, ctx.num_visual if ctx.num_visual is not None else 1)
        Lr = num_valid(ctx)
        z = self._sizes(Lr)
        bc = lambda x: jnp.broadcast_to(x[None, :, None], (L, B, H))  # noqa: E731
        valid = broadcast_lbhs(ctx.valid, (L, B, H, S))
        recent = tail_mask(bc(z["R"]), S) & valid
        past = valid & ~recent
        i_s, c_s = select_topk(s_self, bc(z["k_self"]), K, allowed=past)
        sel_s = keep_mask(i_s, c_s, S)
        cross_allowed = past & ~sel_s if self.combine == "union_dedup" else past
        i_c, c_c = select_topk(s_cross, bc(z["k_cross"]), K, allowed=cross_allowed)
        if self.combine == "and":
            keep = (sel_s & keep_mask(i_c, c_c, S)) | recent
            idx, cnt = select_topk(jnp.zeros(keep.shape), keep.sum(-1), K, protected=keep, allowed=keep)
        else:
            rank = jnp.arange(K, dtype=jnp.int32)
            slot = jnp.arange(S, dtype=jnp.int32)
            parts = jnp.concatenate([
                jnp.where(rank < c_s[..., None], i_s, S),
                jnp.where(rank < c_c[..., None], i_c, S),
                jnp.where(recent, slot, S)], axis=-1)
            idx = jnp.sort(parts, axis=-1)[..., :K]
            cnt = jnp.minimum(c_s + c_c + recent.sum(-1), K).astype(jnp.int32)
            idx = jnp.where(rank < cnt[..., None], idx, PAD_INDEX).astype(jnp.int32)
        # Rows without an image are not pruned (code behaviour), up to the static capacity.
        has_img = ctx.is_visual.any(-1)
        all_idx, all_cnt = select_topk(jnp.zeros((L, B, H, S)), jnp.full((L, B, H), S), K,
                                       protected=valid, allowed=valid)
        idx = jnp.where(has_img[None, :, None, None], idx, all_idx)
        cnt = jnp.where(has_img[None, :, None], cnt, all_cnt)
        return KeepPlan(indices=idx, count=cnt)

    def capacity(self, prompt_len: int, num_visual: int) -> int:
        S = prompt_len
        if num_visual <= 0:
            return S
        O = int(math.floor(S * self.recent_ratio + 1e-6))
        if budgets.is_ratio(self.budget):
            hh = int(math.floor(S * (float(self.budget) - self.recent_ratio) + 1e-6))
        else:
            hh = max(min(int(self.budget), S) - O, 0)
        R = O if self.kv_recent_bias == 1 else int(math.floor(O * self.kv_recent_bias + 1e-6))
        return max(1, min(S, max(hh + O, R) + 1))
