"""LightKV (arXiv 2605.00789): prompt-guided merging of visual hidden states inside the prefill.

Where the paper and the released code (github.com/howtoosee/LightKV) differ, the code is followed and the
paper's variant is an option. After each merge layer the visual span of the hidden states is merged,
ToMe-style, inside windows of the (padded, square) visual grid: alternate A/B split, each A token's most
cosine-similar B partner, the best-matching A tokens folded into their partner by a weighted average
whose weights xi are each token's attention mass towards the text tokens (Eq. 7, 8). Later layers
process (and cache) the shorter sequence. Batched: the visual span is located per row from the tags.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax.methods.base import KeepsPrefillCache, PrefillContext, Reduction, Stage
from vkv_jax.methods.options import BOOL, FRACTION, POSITIVE_INT, Rule, check_fields, option

# Merge layers by decoder depth: LLaVA-1.5-7B (32; the released code's example script) and -13B (40; the
# paper's Table 6 / Appendix E.2).
DEFAULT_LAYERS = {32: (12, 18, 24), 40: (15, 23, 31)}
MIN_TOKENS_PER_WINDOW = 8  # the code skips a stage when an image has fewer than 8 * w^2 tokens
EPS = 1e-8


class WindowPlan(NamedTuple):
    """Static plan of one stage for an n-token image: the released code's windows over the padded square grid
    and its bipartite split (paper Eqs. 4-6), fixed at trace time.

    idx [Wn, Cmax] token indices per window in raster order (padded with 0 past cnt);
    cnt [Wn] tokens per window; r [Wn] A tokens merged per window; n_out surviving tokens.
    """

    idx: np.ndarray
    cnt: np.ndarray
    r: np.ndarray
    n_out: int


@functools.cache
def window_plan(n: int, w: int, rho: float) -> WindowPlan | None:
    """Windows of the padded square grid of an n-token image, or None when the stage is skipped."""
    if n < MIN_TOKENS_PER_WINDOW * w * w:
        return None
    s = math.isqrt(n)
    s = s if s * s == n else s + 1
    base, rem = divmod(s, w)
    sizes = [base + (i < rem) for i in range(w)]
    edges = np.repeat(np.arange(w), sizes)  # window row (or column) of each grid row (column)
    label = (edges[:, None] * w + edges[None, :]).reshape(-1)[:n]  # row-major over windows; padding cut
    wins = [np.nonzero(label == i)[0] for i in range(w * w)]
    cmax = max(len(x) for x in wins)
    idx = np.zeros((w * w, cmax), np.int32)
    for i, x in enumerate(wins):
        idx[i, :len(x)] = x
    cnt = np.array([len(x) for x in wins], np.int32)
    # the code truncates a float32 product; bipartite matching can fold at most |B| = floor(c/2)
    r = np.minimum(np.floor(np.float32(rho) * cnt.astype(np.float32)).astype(np.int32), cnt // 2)
    return WindowPlan(idx, cnt, r, int((cnt - r).sum()))


class GridStage(NamedTuple):
    """Static plan of one stage for one row whose visual span holds several 2-D grids (anyres: each image's
    base crop and its unpadded tile grid; several images). Windows run inside each grid.

    region [n0] int32: the grid of each token of the row's *original* visual span (-1: in no grid, e.g.
      image_newline tokens); orig_rank [n0]: its raster rank inside that grid.
    label [G] tuples: for each grid, the window of each of its current tokens by raster rank (-1 when the
      grid sits this stage out); cnt, r [Wn]: tokens and merged A tokens per window; n_out survivors.
    """

    region: np.ndarray
    orig_rank: np.ndarray
    label: tuple
    cnt: np.ndarray
    r: np.ndarray
    n_out: int


def _window_labels(rows: int, cols: int, m: int, w: int) -> np.ndarray:
    """Window (row-major over w x w) of each of the first m raster cells of a rows x cols grid."""
    def edges(k):
        base, rem = divmod(k, w)
        return np.repeat(np.arange(w), [base + (i < rem) for i in range(w)])

    return (edges(rows)[:, None] * w + edges(cols)[None, :]).reshape(-1)[:m]


@functools.cache
def grid_stages(grids: tuple, n: int, stages: tuple) -> tuple[GridStage | None, ...]:
    """Per-stage plans of one row. grids: ((start, rows, cols, stride), ...) in the row's visual ordinals
    (`models.anyres.ImageLayout.regions`, offset per image); stages: ((w, rho), ...). A grid keeps its
    rows x cols shape until it is merged, then (as the released code treats a merged image) is the padded
    square of its survivors in raster order; a grid with fewer than 8 w^2 tokens sits the stage out. A
    stage where every grid sits out is None (skipped)."""
    region = np.full(n, -1, np.int32)
    orig_rank = np.zeros(n, np.int32)
    shapes = []
    for g, (start, rows, cols, stride) in enumerate(grids):
        ords = start + (np.arange(rows)[:, None] * stride + np.arange(cols)[None, :]).reshape(-1)
        if ords.size and (ords.max() >= n or (region[ords] >= 0).any()):
            raise ValueError(f"lightkv: grid {g} {(start, rows, cols, stride)} overlaps another or leaves the "
                             f"{n}-token visual span")
        region[ords] = g
        orig_rank[ords] = np.arange(ords.size)
        shapes.append([rows, cols, rows * cols, False])  # rows, cols, tokens, merged before
    out = []
    for w, rho in stages:
        labels, cnts, rs, offset = [], [], [], 0
        for shape in shapes:
            rows, cols, m, merged = shape
            if m < MIN_TOKENS_PER_WINDOW * w * w:
                labels.append(None)
                continue
            if merged:
                rows = cols = math.isqrt(m) + (math.isqrt(m) ** 2 != m)
            lab = _window_labels(rows, cols, m, w)
            cnt = np.bincount(lab, minlength=w * w).astype(np.int32)
            r = np.minimum(np.floor(np.float32(rho) * cnt.astype(np.float32)).astype(np.int32), cnt // 2)
            labels.append(tuple(int(x) + offset for x in lab))
            cnts.append(cnt)
            rs.append(r)
            offset += w * w
            shape[2], shape[3] = m - int(r.sum()), True
        if not cnts:
            out.append(None)
            continue
        n_out = n - int(sum(r.sum() for r in rs))
        out.append(GridStage(region, orig_rank, tuple(labels), np.concatenate(cnts), np.concatenate(rs), n_out))
        n = n_out
    return tuple(out)


def _grid_windows(stage: GridStage, ctx_b: tuple, vis_b: jax.Array) -> jax.Array:
    """idx [Wn, Cmax] (traced): the current visual-span index of each window's tokens in raster order.

    ctx_b = (positions, valid, is_visual) of one row [S]; vis_b [n] the slots of its visual tokens in order.
    A token's original visual ordinal is its original position minus the text tokens before it (text is
    never merged and the order is kept), which gives its grid; its raster rank among that grid's current
    tokens is a running count.
    """
    pos, valid, is_vis = ctx_b
    text_before = jnp.cumsum(valid & ~is_vis) - (valid & ~is_vis)
    first = jnp.min(jnp.where(valid, pos, jnp.iinfo(jnp.int32).max))
    ord0 = (pos - first - text_before)[vis_b]  # [n] original visual ordinals
    region = jnp.asarray(stage.region)[ord0]
    n = vis_b.shape[0]
    win = jnp.full(n, stage.cnt.shape[0], jnp.int32)  # past every window: in none
    for g, lab in enumerate(stage.label):
        mine = region == g
        if lab is None:
            continue
        rank = jnp.cumsum(mine) - 1
        win = jnp.where(mine, jnp.asarray(np.asarray(lab, np.int32))[jnp.clip(rank, 0, len(lab) - 1)], win)
    order = jnp.argsort(win, stable=True)  # by window, raster order inside (ranks ascend with the slots)
    offs = np.concatenate([[0], np.cumsum(stage.cnt)[:-1]])
    cmax = int(stage.cnt.max())
    gather = np.minimum(offs[:, None] + np.arange(cmax)[None, :], n - 1)  # padding past cnt: any valid index
    return order[jnp.asarray(gather)]


def eq9_kept_fraction(num_layers: int, merge_layers: tuple[int, ...], merge_ratios: tuple[float, ...]) -> float:
    """The paper's Eq. 9: average share of visual tokens processed per layer, counting lam_1 full layers
    (the code keeps lam_1 + 1; `visual_per_layer` gives the code's exact counts)."""
    bounds = (0,) + tuple(merge_layers) + (num_layers,)
    kept, total = 1.0, 0.0
    for i in range(len(bounds) - 1):
        total += (bounds[i + 1] - bounds[i]) * kept
        if i < len(merge_ratios):
            kept *= 1.0 - merge_ratios[i]
    return total / num_layers


def prompt_guidance(q: jax.Array, k: jax.Array, ctx: PrefillContext, axis: str = "query") -> jax.Array:
    """xi [B, S] float32 (Eq. 7): each token's attention mass with the text tokens, summed over heads.

    q [B, Hq, S, Dh], k [B, Hkv, S, Dh] post-RoPE at the merge layer. Pre-mask logits (no causal mask:
    the question follows the image). Text = valid non-visual slots; padding is neither query nor key.
    axis='query' (code default): softmax over the queries of each text-key column, xi_i = sum_h sum_t P.
    axis='key' (paper Eq. 2 ablation): softmax over all keys of each row, xi_i = sum_h sum_t P[i, t].
    """
    B, Hq, S, Dh = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, S, Dh)
    text = ctx.valid & ~ctx.is_visual
    if axis == "query":
        n_text = S - ctx.num_visual  # static: every row holds exactly num_visual visual slots
        text_idx = jnp.argsort(~text, axis=1, stable=True)[:, :n_text]  # [B, T] (padding last)
        kt = jnp.take_along_axis(k, text_idx[:, None, :, None], axis=2)
        logits = jnp.einsum("bkgqd,bktd->bkgqt", qg, kt, preferred_element_type=jnp.float32) * Dh ** -0.5
        logits = jnp.where(ctx.valid[:, None, None, :, None], logits, -jnp.inf)
        p = jax.nn.softmax(logits, axis=3)
        col = jnp.take_along_axis(text, text_idx, axis=1)  # real text columns
        return jnp.einsum("bkgqt,bt->bq", p, col.astype(jnp.float32))
    logits = jnp.einsum("bkgqd,bksd->bkgqs", qg, k, preferred_element_type=jnp.float32) * Dh ** -0.5
    logits = jnp.where(ctx.valid[:, None, None, None, :], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=4)
    return jnp.einsum("bkgqs,bs->bq", p, text.astype(jnp.float32))


def merge_image(x: jax.Array, xi: jax.Array, plan: WindowPlan) -> tuple[jax.Array, jax.Array]:
    """One stage on one image: x [n, D] hidden states in raster order, xi [n] guidance weights.

    Returns x [n, D] with every B token that absorbed A tokens replaced by the weighted average of
    Eq. 8, and survive [n] bool (all but the merged A tokens): the survivors in raster order are the
    new image span (the paper's reassembly step). `plan.idx` may be a traced array (`grid_stage`).
    """
    n, D = x.shape
    idx, cnt = jnp.asarray(plan.idx), jnp.asarray(plan.cnt)
    valid = jnp.arange(idx.shape[1]) < cnt[:, None]  # [Wn, Cmax]
    X = x[idx].astype(jnp.float32)
    XI = xi[idx].astype(jnp.float32)
    # alternate split inside each window: A = even positions (ToMe "src"), B = odd ("dst")
    Xa, Xb, XIa, XIb = X[:, 0::2], X[:, 1::2], XI[:, 0::2], XI[:, 1::2]
    va, vb, ia, ib = valid[:, 0::2], valid[:, 1::2], idx[:, 0::2], idx[:, 1::2]
    na, nb = jnp.linalg.norm(Xa, axis=-1), jnp.linalg.norm(Xb, axis=-1)
    sim = jnp.einsum("wad,wbd->wab", Xa, Xb) / (na[..., :, None] * nb[..., None, :] + EPS)  # cosine, Eq. 5
    sim = jnp.where(va[..., :, None] & vb[..., None, :], sim, -jnp.inf)
    best = jnp.where(va, sim.max(-1), -jnp.inf)
    partner = jnp.argmax(sim, axis=-1)  # [Wn, Ca]; many A may share one B
    rank = jnp.argsort(jnp.argsort(-best, axis=-1, stable=True), axis=-1, stable=True)
    merged = (rank < jnp.asarray(plan.r)[:, None]) & va  # the r best-matching A tokens per window
    fold = merged[..., None] & (partner[..., None] == jnp.arange(Xb.shape[1]))  # M [Wn, Ca, Cb]
    w_a = jnp.where(merged, XIa, 0.0)
    touched = fold.any(1)
    w_b = jnp.where(touched, XIb, 1.0)
    num = Xb * w_b[..., None] + jnp.einsum("wab,wa,wad->wbd", fold.astype(jnp.float32), w_a, Xa)
    den = w_b + jnp.einsum("wab,wa->wb", fold.astype(jnp.float32), w_a)
    Xb_new = num / jnp.maximum(den, EPS)[..., None]
    out_b = jnp.where(touched & vb, ib, n).reshape(-1)  # untouched B tokens stay bit-identical
    x = x.at[out_b].set(Xb_new.reshape(-1, D).astype(x.dtype), mode="drop")
    # every token survives but the merged A ones (tokens in no window, e.g. image_newline, are untouched)
    survive = jnp.ones(n, bool).at[jnp.where(merged, ia, n).reshape(-1)].set(False, mode="drop")
    return x, survive


def _as_tuple(value, name: str, rule: Rule) -> tuple:
    """merge_windows / merge_ratios as given (one value, a sequence, or the code's "4-2-1" form, which is also
    what a CLI option passes) -> a tuple whose every entry `rule` accepts (TypeError / ValueError naming it)."""
    items = value.split("-") if isinstance(value, str) else value
    if isinstance(items, np.ndarray) and items.ndim == 1:
        items = items.tolist()
    if not isinstance(items, (tuple, list)):
        items = (items,)
    if not items:
        raise ValueError(f"lightkv's {name} is empty: give 1 entry (used at every stage) or one per merge layer")
    out = []
    for v in items:
        what = f"lightkv's {name} entry {v!r} (of {value!r})"
        if isinstance(v, str):
            try:
                v = rule.parse(v.strip())
            except ValueError:
                raise TypeError(f"{what} must be {rule.describe()}") from None
        out.append(rule.check(v, what))
    return tuple(out)


def _layer_tuple(value) -> tuple[int, ...] | None:
    """merge_layers as given (an int, a sequence of ints, or "12-18-24") -> a checked tuple of ints."""
    if value is None:
        return None
    items = value.split("-") if isinstance(value, str) else value
    if not isinstance(items, (tuple, list)):
        items = (items,)
    out = []
    for v in items:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"merge_layers must be 0-based layer indices (ints, or 'a-b-c'), got {value!r}: "
                            f"{v!r} is not an integer")
        out.append(int(v))
    layers = tuple(out)
    if not layers:
        raise ValueError("merge_layers is empty: give at least one 0-based layer index (None: the default schedule)")
    for prev, layer in zip((None,) + layers, layers):
        if layer < 0:
            raise ValueError(f"merge_layers {layers}: layer {layer} is negative; merge layers are 0-based decoder "
                             "layer indices")
        if prev is not None and layer == prev:
            raise ValueError(f"merge_layers {layers}: layer {layer} appears twice; each merge layer must be greater "
                             "than the one before")
        if prev is not None and layer < prev:
            raise ValueError(f"merge_layers {layers}: layer {layer} comes after layer {prev}; merge layers must be "
                             f"strictly increasing (e.g. {tuple(sorted(set(layers)))})")
    return layers


def _per_stage(values: tuple, name: str, layers: tuple[int, ...]) -> None:
    n = len(layers)
    if len(values) not in (1, n):
        default = " (its default is for the 3-stage LLaVA-1.5 schedule)" if name == "merge_windows" else ""
        raise ValueError(f"merge_layers {layers} gives {n} merge stage(s) but {name} has {len(values)} entries "
                         f"{values}{default}: give 1 entry (used at every stage){'' if n == 1 else f' or {n}'}")


@dataclasses.dataclass(frozen=True)
class LightKV(KeepsPrefillCache):
    """Prompt-guided in-prefill merging of visual tokens; no post-prefill eviction.

    merge_layers:  0-based layers after which to merge. None: the published schedule for the model depth
                   (32 layers: 12,18,24; 40 layers: 15,23,31), else the 32-layer schedule scaled to the
                   depth (floor(L*12/32), ...) with stages at or past the last layer dropped.
    merge_windows: windows per side per stage (4,2,1 as for LLaVA-1.5).
    merge_ratios:  fraction of the current visual tokens removed per stage (0.5; matching removes at most
                   half of each window). Lists of length 1 broadcast; "12-18-24" strings are accepted.
    xi_axis:       'query' (code: softmax over queries) or 'key' (paper Eq. 2, for ablation).
    keep_original_positions: RoPE at the tokens' original positions in later layers (ablation); default
                   False re-indexes the shortened prefill 0..n-1 as the code does (the paper is silent). Decoding
                   continues at the original prompt length in every layer either way.
    budget:        must be None (the schedule sets the compression; 576 -> 288 -> 145 -> 73 by default).
    grids:         None (one image per row: the row's visual span is one padded square grid, as the code), or
                   per row the 2-D grids of its visual span, ((start, rows, cols, stride), ...) in visual
                   ordinals. `vkv_jax.generate` binds it for anyres models and prompts with several images
                   (`with_grids`): windows then run inside each grid (the base crop, the unpadded tile grid of
                   each image; image_newline tokens are in none and never merged).
    visual_tokens: with `grids`, each row's visual-token count (bound with them): rows may then differ in
                   counts and grids, each row merging exactly as it would alone (its own static plan; the
                   shortened sequence is as long as the row that merges the fewest needs, the others'
                   extra slots dead). Without it every row must hold the batch's static count.
    """

    budget: None = None
    merge_layers: tuple[int, ...] | None = None
    merge_windows: tuple[int, ...] = (4, 2, 1)
    merge_ratios: tuple[float, ...] = (0.5,)
    xi_axis: str = option("query", Rule("choice", choices=("query", "key")))
    keep_original_positions: bool = option(False, BOOL)
    grids: tuple | None = None
    visual_tokens: tuple[int, ...] | None = None

    @property
    def ragged_visual(self) -> bool:
        """Rows of different visual counts are supported (`methods.base`): with grids and their counts."""
        return self.grids is not None and self.visual_tokens is not None

    def __post_init__(self):
        if self.budget is not None:
            raise ValueError(f"lightkv takes no budget (got {self.budget!r}): its compression is set by "
                             "merge_layers / merge_windows / merge_ratios")
        check_fields(self)
        layers = _layer_tuple(self.merge_layers)
        windows = _as_tuple(self.merge_windows, "merge_windows", POSITIVE_INT)
        ratios = _as_tuple(self.merge_ratios, "merge_ratios", FRACTION)
        object.__setattr__(self, "merge_layers", layers)
        object.__setattr__(self, "merge_windows", windows)
        object.__setattr__(self, "merge_ratios", ratios)
        if layers is not None:
            _per_stage(windows, "merge_windows", layers)
            _per_stage(ratios, "merge_ratios", layers)

    def stages(self, num_layers: int) -> tuple[tuple[int, int, float], ...]:
        """(layer, windows per side, ratio) per stage for a decoder of `num_layers` layers."""
        layers = self.merge_layers
        if layers is None:
            layers = DEFAULT_LAYERS.get(num_layers)
            if layers is None:
                scaled = sorted({num_layers * lam // 32 for lam in DEFAULT_LAYERS[32]})
                layers = tuple(lam for lam in scaled if lam < num_layers - 1)
        elif layers[-1] >= num_layers - 1:
            allowed = (f"merge layers must be in 0..{num_layers - 2} (after the last layer, {num_layers - 1}, "
                       "nothing is left to shorten)")
            if num_layers == 1:
                allowed = "a 1-layer model has no layer to merge after"
            bad = next(layer for layer in layers if layer >= num_layers - 1)
            raise ValueError(f"merge_layers {layers}: layer {bad} is out of range for this {num_layers}-layer "
                             f"model: {allowed}")
        n = len(layers)
        if any(len(x) != 1 and len(x) < n for x in (self.merge_windows, self.merge_ratios)):
            raise ValueError(f"merge_windows {self.merge_windows} and merge_ratios {self.merge_ratios} need 1 or "
                             f"{n} entries for merge layers {layers}")
        windows = self.merge_windows * n if len(self.merge_windows) == 1 else self.merge_windows
        ratios = self.merge_ratios * n if len(self.merge_ratios) == 1 else self.merge_ratios
        return tuple(zip(layers, windows[:n], ratios[:n]))

    def with_grids(self, grids, visual_tokens=None) -> LightKV:
        """This method with the batch's per-row grids (see `grids`) and, optionally, each row's visual-token
        count (`visual_tokens`); None keeps the one-square behaviour."""
        grids = None if grids is None else tuple(tuple(tuple(int(v) for v in g) for g in row) for row in grids)
        if visual_tokens is not None:
            visual_tokens = tuple(int(n) for n in visual_tokens)
            if grids is None or len(visual_tokens) != len(grids):
                raise ValueError(f"lightkv: visual_tokens {visual_tokens} need grids for as many rows")
        return dataclasses.replace(self, grids=grids, visual_tokens=visual_tokens)

    def _grid_plans(self, num_layers: int, num_visual: int) -> list[tuple[tuple[GridStage | None, int], ...]]:
        """Per row, per stage: (its GridStage or None when it sits the stage out, its visual count entering
        the stage), from the row's own count (`visual_tokens`, else the batch's `num_visual`)."""
        stages = tuple((w, rho) for _, w, rho in self.stages(num_layers))
        counts = self.visual_tokens or (num_visual,) * len(self.grids)
        plans = []
        for row, n in zip(self.grids, counts, strict=True):
            steps = []
            for gs in grid_stages(row, n, stages):
                steps.append((gs, n))
                n = n if gs is None else gs.n_out
            plans.append(tuple(steps))
        return plans

    def schedule(self, num_layers: int, num_visual: int) -> Reduction:
        if self.grids is not None:
            plans = self._grid_plans(num_layers, num_visual)
            out = []
            for i, (layer, w, rho) in enumerate(self.stages(num_layers)):
                if all(p[i][0] is None for p in plans):
                    continue
                after = [n if gs is None else gs.n_out for gs, n in (p[i] for p in plans)]
                before = [n for _, n in (p[i] for p in plans)]
                out.append(Stage(layer=layer, num_visual=min(after), arg=(w, rho, i, num_layers, num_visual),
                                 dropped=min(b - a for b, a in zip(before, after))))
            return Reduction(tuple(out), reindex_positions=not self.keep_original_positions)
        out, n = [], num_visual
        for layer, w, rho in self.stages(num_layers):
            plan = window_plan(n, w, rho)
            if plan is None:  # too few tokens for w*w windows: the stage is skipped (the code's rule)
                continue
            n = plan.n_out
            out.append(Stage(layer=layer, num_visual=n, arg=(w, rho)))
        return Reduction(tuple(out), reindex_positions=not self.keep_original_positions)

    def reduce(self, stage: Stage, x, q, k, ctx: PrefillContext):
        xi = prompt_guidance(q, k, ctx, self.xi_axis)
        if self.grids is not None:
            return self._reduce_grids(stage, x, xi, ctx)
        vis = jnp.argsort(~ctx.is_visual, axis=1, stable=True)[:, :ctx.num_visual]  # [B, n] raster order
        w, rho = stage.arg
        plan = window_plan(ctx.num_visual, w, rho)

        def row(x_b, xi_b, vis_b):
            merged, survive = merge_image(x_b[vis_b], xi_b[vis_b], plan)
            keep = jnp.ones(x_b.shape[0], bool).at[vis_b].set(survive)
            return x_b.at[vis_b].set(merged), keep

        return jax.vmap(row)(x, xi, vis)

    def _reduce_grids(self, stage: Stage, x, xi, ctx: PrefillContext):
        """`reduce` with windows inside each grid; rows may differ in layout and count (one static plan
        per row)."""
        if len(self.grids) != x.shape[0]:
            raise ValueError(f"lightkv: grids are bound for {len(self.grids)} rows, the batch has {x.shape[0]}")
        _, _, index, num_layers, num_visual = stage.arg
        plans = self._grid_plans(num_layers, num_visual)
        order = jnp.argsort(~ctx.is_visual, axis=1, stable=True)  # each row's visual slots first, in order
        xs, keeps = [], []
        for b in range(x.shape[0]):
            gs, n = plans[b][index]
            if gs is None:  # this row's grids all sit the stage out
                xs.append(x[b])
                keeps.append(jnp.ones(x.shape[1], bool))
                continue
            vis = order[b, :n]  # [n] the row's own visual slots, raster order
            idx = _grid_windows(gs, (ctx.positions[b], ctx.valid[b], ctx.is_visual[b]), vis)
            merged, survive = merge_image(x[b][vis], xi[b][vis], WindowPlan(idx, gs.cnt, gs.r, gs.n_out))
            keeps.append(jnp.ones(x.shape[1], bool).at[vis].set(survive))
            xs.append(x[b].at[vis].set(merged))
        return jnp.stack(xs), jnp.stack(keeps)
