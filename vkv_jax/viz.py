"""What the notebooks in `colab/` draw, as tested package code.

Two kinds of helpers:

* facts from a run — which visual tokens each layer kept (`visual_keep_map`, `keep_maps`), decode
  timings (`time_decode`); accuracy sweeps come from `vkv_jax.evaluation.harness.evaluate`;
* figures from those facts — keep heatmaps over the image, per-layer budgets, accuracy and KV bytes
  against budget or KV fraction, decode throughput. Every plotting function returns a
  `matplotlib.figure.Figure` and draws nothing else (notebooks show it, tests check it, `fig.savefig`
  writes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vkv_jax import cache as cache_lib

# ----------------------------------------------------------------------------- keep-sets


def visual_index_by_position(input_ids: np.ndarray, valid: np.ndarray, image_token_id: int) -> np.ndarray:
    """int32 [B, S]: for each original position p of row b, the visual token index (raster order,
    0.. across the row's images) of the token at p, or -1 for text / padding positions.

    input_ids, valid: [B, S] left-padded prompt batch (`Inputs.input_ids`, `Inputs.valid`).
    """
    ids = np.asarray(input_ids)
    valid = np.asarray(valid, bool)
    B, S = ids.shape
    out = np.full((B, S), -1, np.int32)
    for b in range(B):
        real = ids[b][valid[b]]  # position p is the p-th real token
        is_img = real == image_token_id
        out[b, : real.size][is_img] = np.arange(int(is_img.sum()), dtype=np.int32)
    return out


def visual_keep_map(cache, input_ids: np.ndarray, valid: np.ndarray,
                    image_token_id: int, num_visual: int) -> np.ndarray:
    """float32 [L, B, num_visual]: the fraction of kv heads of each layer whose (compacted) cache still
    holds each visual token. 1 = every head kept it, 0 = evicted everywhere.

    `cache`: a KVCache (e.g. what `request.prefill` returns) or the host layout dict
    `generate(..., return_layout=True).layout` ({"pos", "tag", "length"}). A live slot with tag VISION
    and original position p is visual token `visual_index_by_position(...)[b, p]`; generated slots are
    ignored.
    """
    layout = cache if isinstance(cache, dict) else {"pos": cache.pos, "tag": cache.tag, "length": cache.length}
    pos, tag, length = (np.asarray(layout[k]) for k in ("pos", "tag", "length"))  # [L, B, H, C], [L, B, H]
    live = (np.arange(pos.shape[-1]) < length[..., None]) & (pos >= 0) & (tag == cache_lib.VISION)
    L, B, H, _ = pos.shape
    index = visual_index_by_position(input_ids, valid, image_token_id)  # [B, S]
    S = index.shape[1]
    counts = np.zeros((L, B, num_visual), np.float32)
    for b in range(B):
        p = np.clip(pos[:, b], 0, S - 1)
        vis = np.where(live[:, b], index[b][p], -1)  # [L, H, C]
        for layer in range(L):
            v = vis[layer]
            counts[layer, b] += np.bincount(v[(v >= 0) & (v < num_visual)], minlength=num_visual)[:num_visual]
    return counts / H


def to_grid(keep: np.ndarray) -> np.ndarray:
    """[..., N] -> [..., g, g] for a square patch grid in raster order (N = g * g)."""
    n = keep.shape[-1]
    g = int(round(np.sqrt(n)))
    if g * g != n:
        raise ValueError(f"{n} visual tokens do not form a square grid")
    return keep.reshape(keep.shape[:-1] + (g, g))


def keep_maps(model, inputs, compressions: Mapping[str, Any], max_new_tokens: int = 8,
              grid: int = 0) -> dict[str, np.ndarray]:
    """{label: float32 [L, B, rows, cols]} keep fractions after prefill + compression, per method, over one
    image grid of every row: the row's `grid`-th (`models.anyres.row_regions` of `inputs.layouts`: 0 is
    the first image's patch grid under LLaVA-1.5 and Qwen2-VL, its base crop under LLaVA-NeXT /
    OneVision, whose tile grid is 1). Every row's grid must have the same shape (ValueError otherwise).

    compressions: {label: vkv_jax.Compression}. Runs `vkv_jax.generate` (whose compiled executables are
    cached, so calling this after generating with the same batch and `max_new_tokens` compiles nothing).
    """
    from vkv_jax.api import generate
    from vkv_jax.models import anyres

    if inputs.pixel_values is None or not inputs.layouts or not all(inputs.layouts):
        raise ValueError("keep_maps needs inputs prepared with images (model.prepare), an image in every row")
    regions = [anyres.row_regions(row) for row in inputs.layouts]
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or not 0 <= grid < min(map(len, regions)):
        raise ValueError(f"grid must be an index into every row's image grids (rows hold "
                         f"{[len(r) for r in regions]}), got {grid!r}")
    shapes = sorted({r[grid][1:3] for r in regions})
    if len(shapes) > 1:
        raise ValueError(f"grid {grid} has different shapes in different rows ({shapes}): draw rows with "
                         "images of one size, or one row at a time")
    cells = [anyres.region_tokens(r[grid]) for r in regions]  # [rows, cols] visual ordinals per row
    n_vis = max(inputs.visual_tokens)
    out = {}
    for label, comp in compressions.items():
        layout = generate(model, inputs, max_new_tokens, comp, return_layout=True).layout
        keep = visual_keep_map(layout, inputs.input_ids, inputs.valid, model.config.image_token_id, n_vis)
        out[label] = np.stack([keep[:, b][:, c] for b, c in enumerate(cells)], axis=1)
    return out


# ----------------------------------------------------------------------------- timings


def time_decode(model, inputs, compression, max_new_tokens: int = 16, repeats: int = 2) -> dict[str, float]:
    """Decode throughput of one method on the current backend: best of `repeats` timed runs, compile
    excluded (`generate` compiles ahead of time and times only the run). Returns tokens/s, decode_s,
    kv_bytes, kv_bytes_allocated."""
    from vkv_jax.api import generate

    best = None
    for _ in range(repeats):
        s = generate(model, inputs, max_new_tokens, compression).stats
        if best is None or s["decode_s"] < best["decode_s"]:
            best = s
    return {k: float(best[k]) for k in ("decode_tokens_per_s", "decode_s", "kv_bytes", "kv_bytes_allocated")}


# ----------------------------------------------------------------------------- tables


def stats_table(outputs: Mapping[str, Any], row: int = 0) -> str:
    """A text table of `generate` outputs ({label: GenerateOutput}): answer of prompt `row`, kept
    prompt tokens (text + vision, summed over layers' means), live KV bytes and their share of full."""
    lines = [f"{'run':<16} {'answer':<24} {'kept text/layer':>16} {'kept vision/layer':>18} {'KV KiB':>8} "
             f"{'of full':>8}"]
    for label, out in outputs.items():
        s = out.stats
        txt = "/".join(f"{x:g}" for x in s["kept_text_per_layer"])
        vis = "/".join(f"{x:g}" for x in s["kept_vision_per_layer"])
        share = s["kv_bytes"] / max(s["kv_bytes_full"], 1.0)
        answer = out.text[row][:24]
        lines.append(f"{label:<16} {answer!s:<24} {txt:>16} {vis:>18} {s['kv_bytes'] / 1024:>8.1f} {share:>8.0%}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def plot_image(image: np.ndarray, title: str = "", cells: Sequence[tuple[int, int]] = (), grid: int = 8,
               size: float = 2.4):
    """The example image alone (evidence `cells` outlined on a `grid`×`grid` cell grid)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
    H, W = image.shape[:2]
    ax.imshow(image)
    for (cr, cc) in cells:
        ax.add_patch(plt.Rectangle((cc * W / grid - 0.5, cr * H / grid - 0.5), W / grid, H / grid, fill=False,
                                   edgecolor="cyan", linewidth=1.2))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8, wrap=True)
    return fig


def plot_keep_heatmaps(image: np.ndarray, maps: Mapping[str, np.ndarray],
                       cells: Sequence[tuple[int, int]] = (), grid: int | None = None,
                       size: float = 1.6):
    """A grid of small images: one row per method, one column per layer; each panel is the image with
    the layer's keep fraction (0..1, [g, g] per panel) laid over it; evicted patches are dimmed.

    image: [H, W, 3] uint8. maps: {label: [L, g, g]} (one prompt of `keep_maps`' output).
    cells: (row, col) evidence cells of the question (outlined in every panel) on a `grid`×`grid`
    cell grid (default: the patch grid).
    """
    plt = _pyplot()
    labels = list(maps)
    if not labels:
        raise ValueError("plot_keep_heatmaps needs at least one map")
    L = maps[labels[0]].shape[0]
    H, W = image.shape[:2]
    fig, axes = plt.subplots(len(labels), L, figsize=(size * L + 0.6, size * len(labels)), squeeze=False,
                             constrained_layout=True)
    for r, label in enumerate(labels):
        m = np.asarray(maps[label], np.float32)
        if m.ndim != 3 or m.shape[0] != L:
            raise ValueError(f"map {label!r} has shape {m.shape}; expected [{L}, g, g]")
        for layer in range(L):
            ax = axes[r, layer]
            ax.imshow(image, extent=(0, W, H, 0))
            # evicted patches are darkened, kept ones lightened (the testbed's background is dark grey)
            keep = m[layer]
            shade = np.repeat(keep[..., None], 4, axis=-1)
            shade[..., 3] = 0.35 * keep + 0.85 * (1.0 - keep)
            ax.imshow(shade, extent=(0, W, H, 0), interpolation="nearest")
            g = grid or m.shape[-1]
            for (cr, cc) in cells:
                ax.add_patch(plt.Rectangle((cc * W / g, cr * H / g), W / g, H / g, fill=False,
                                           edgecolor="cyan", linewidth=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
            if layer == 0:
                ax.set_ylabel(f"{label}\n{float(m.mean()):.0%} kept", fontsize=8)
    import matplotlib as mpl

    shades = mpl.colors.LinearSegmentedColormap.from_list("kept", [(0.15, 0.15, 0.15), (1.0, 1.0, 1.0)])
    fig.colorbar(mpl.cm.ScalarMappable(mpl.colors.Normalize(0.0, 1.0), shades), ax=axes, shrink=0.8,
                 label="fraction of kv heads keeping the patch")
    return fig


def plot_layer_budgets(stats: Mapping[str, Mapping[str, Any]], size: tuple[float, float] = (6.0, 2.8)):
    """Grouped bars: kept prompt tokens per layer (vision solid, text hatched on top), one colour per
    method. stats: {label: `generate(...).stats`} (uses kept_vision_per_layer / kept_text_per_layer)."""
    plt = _pyplot()
    labels = list(stats)
    L = len(stats[labels[0]]["kept_vision_per_layer"])
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    x = np.arange(L)
    for i, label in enumerate(labels):
        vis = np.asarray(stats[label]["kept_vision_per_layer"], float)
        txt = np.asarray(stats[label]["kept_text_per_layer"], float)
        xs = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(xs, vis, width, label=label)
        ax.bar(xs, txt, width, bottom=vis, color=bars.patches[0].get_facecolor(), alpha=0.45, hatch="//")
    ax.set_xticks(x, [f"layer {i}" for i in range(L)])
    ax.set_ylabel("kept prompt tokens")
    ax.set_title("kept tokens per layer, mean over kv heads (vision solid, text hatched)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _by_method(records: Sequence[Any]):
    out: dict[str, list[Any]] = {}
    for r in records:
        out.setdefault(r.method, []).append(r)
    return out


def plot_accuracy_vs_budget(records: Sequence[Any], size: tuple[float, float] = (4.5, 3.0),
                            references: Mapping[str, float] | None = None, xscale: str = "linear",
                            ylabel: str = "exact-match accuracy"):
    """Accuracy against budget, one line per method; "full" is a dashed horizontal line, each of
    `references` ({label: accuracy}, e.g. a question-only baseline) a dotted one."""
    fig = _plot_vs_budget(records, lambda r: r.accuracy, ylabel, size, ylim=(-0.02, 1.02))
    ax = fig.axes[0]
    for (label, value), colour in zip((references or {}).items(), ("tab:gray", "tab:brown", "tab:pink")):
        ax.axhline(value, color=colour, linestyle=":", linewidth=1.2, label=label)
    ax.set_xscale(xscale)
    budgets = sorted({float(r.budget) for r in records if r.budget is not None})
    if budgets:  # label the budgets themselves (a log axis would otherwise show only powers of ten)
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_kv_bytes_vs_budget(records: Sequence[Any], size: tuple[float, float] = (4.5, 3.0)):
    """Live KV bytes per prompt (KiB) against budget, one line per method; "full" dashed."""
    return _plot_vs_budget(records, lambda r: r.kv_bytes / 1024, "live KV KiB per prompt", size)


def _plot_vs_budget(records, value, ylabel, size, ylim=None):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    for method, rs in _by_method(records).items():
        if method == "full" or all(r.budget is None for r in rs):
            ax.axhline(value(rs[0]), color="k", linestyle="--", linewidth=1, label=method)
            continue
        rs = sorted(rs, key=lambda r: float(r.budget))
        ax.plot([float(r.budget) for r in rs], [value(r) for r in rs], marker="o", label=method)
    ax.set_xlabel("budget")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7)
    return fig


def plot_decode_timing(timings: Mapping[str, Mapping[str, float]], backend: str = "",
                       size: tuple[float, float] = (4.5, 2.6)):
    """Horizontal bars of decode tokens/s per run label ({label: `time_decode(...)`})."""
    plt = _pyplot()
    labels = list(timings)
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    ax.barh(labels, [timings[k]["decode_tokens_per_s"] for k in labels], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s" + (f" ({backend})" if backend else ""))
    return fig


def plot_accuracy_vs_kv(results: Sequence[Any], size: tuple[float, float] = (10.0, 3.6)):
    """Exact-match accuracy and answer-patch recall against the live KV fraction, one line per method
    (`evaluate.Result`s; full cache dashed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=size, constrained_layout=True)
    for method in dict.fromkeys(r.method for r in results):
        rs = sorted((r for r in results if r.method == method), key=lambda r: r.kv_fraction)
        x = [r.kv_fraction for r in rs]
        style = dict(marker="o", label=method, linestyle="--" if method == "full" else "-")
        axes[0].plot(x, [r.accuracy for r in rs], **style)
        if all(r.answer_patch_recall is not None for r in rs):
            axes[1].plot(x, [r.answer_patch_recall for r in rs], **style)
    for ax, ylabel in zip(axes, ("exact-match accuracy", "answer-patch recall (mean over layers)")):
        ax.set_xscale("log")
        ax.set_xlabel("live KV / full KV")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig
