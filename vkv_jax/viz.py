"""What the notebooks in `colab/` draw, as tested package code.

Two kinds of helpers:

* facts from a run — which visual tokens each layer kept (`visual_keep_map`, `keep_maps`), a small
  exact-match sweep over synthetic examples (`sweep`), decode timings (`time_decode`);
* figures from those facts — keep heatmaps over the image, per-layer budgets, accuracy and KV bytes
  against budget, decode throughput. Every plotting function returns a `matplotlib.figure.Figure`
  and draws nothing else (notebooks show it, tests check it, `fig.savefig` writes it).

`sweep` is a stand-in for `python -m vkv_jax.evaluate` (not landed yet): batched greedy decoding of
a slice of the synthetic test split, exact match of the answer's first word.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

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


def visual_keep_map(cache: cache_lib.KVCache, input_ids: np.ndarray, valid: np.ndarray,
                    image_token_id: int, num_visual: int) -> np.ndarray:
    """float32 [L, B, num_visual]: the fraction of kv heads of each layer whose (compacted) cache still
    holds each visual token. 1 = every head kept it, 0 = evicted everywhere.

    Works from the cache alone: a live slot with tag VISION and original position p is visual token
    `visual_index_by_position(...)[b, p]`. Use the cache `decode.prefill` returns (before decoding, or
    after: generated slots carry tag GENERATED and are ignored).
    """
    pos = np.asarray(cache.pos)  # [L, B, H, C]
    live = np.asarray(cache.live_mask()) & (np.asarray(cache.tag) == cache_lib.VISION)
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


def keep_maps(model, inputs, compressions: Mapping[str, Any], max_new_tokens: int = 8) -> dict[str, np.ndarray]:
    """{label: float32 [L, B, g, g]} keep fractions after prefill + compression, per method.

    compressions: {label: vkv_jax.Compression}. Reuses the executable `vkv_jax.generate` compiled for
    the same batch shape and `max_new_tokens` (no second compile when called after it).
    """
    import jax.numpy as jnp

    from vkv_jax import api, decode
    from vkv_jax.methods import build

    if inputs.pixel_values is None:
        raise ValueError("keep_maps needs inputs prepared with images")
    args = dict(params=model.params, input_ids=jnp.asarray(inputs.input_ids), valid=jnp.asarray(inputs.valid),
                pixel_values=jnp.asarray(inputs.pixel_values, model.dtype))
    n_vis = model.config.num_image_tokens * (inputs.pixel_values.shape[0] // inputs.batch_size)
    out = {}
    for label, comp in compressions.items():
        run, _ = api._compiled(decode.prefill_jit, dict(cfg=model.config, method=build(comp),
                                                         max_new_tokens=max_new_tokens), **args)
        _, cache, _, _ = run(**args)
        keep = visual_keep_map(cache, inputs.input_ids, inputs.valid, model.config.image_token_id, n_vis)
        out[label] = to_grid(keep)
    return out


# ----------------------------------------------------------------------------- sweeps


def normalize_answer(text: str) -> str:
    """First word, lower case, punctuation stripped ('Red.' -> 'red'); '' for an empty answer."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


@dataclasses.dataclass
class SweepRecord:
    method: str
    budget: float | int | None
    accuracy: float  # exact match of the first answer word
    n: int
    kv_bytes: float  # mean live KV bytes per prompt after compression
    kv_bytes_full: float  # mean live KV bytes per prompt without compression
    answers: list[str]


def sweep(model, examples: Sequence[Any], methods: Iterable[str], budgets: Sequence[float | int],
          max_new_tokens: int = 4, batch_size: int = 8) -> list[SweepRecord]:
    """Exact-match accuracy and KV bytes of every method × budget on `examples` (synthetic `Example`s:
    `.image`, `.question`, `.answer`). "full" runs once with budget None. Greedy decoding, batched."""
    from vkv_jax.api import generate
    from vkv_jax.methods import Compression

    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batches.append((chunk, model.prepare([e.image for e in chunk], [e.question for e in chunk])))
    runs = []
    for name in methods:
        runs += [(name, None)] if name == "full" else [(name, b) for b in budgets]
    records = []
    for name, budget in runs:
        answers, kv, kv_full = [], 0.0, 0.0
        for chunk, inputs in batches:
            out = generate(model, inputs, max_new_tokens, Compression(name, budget=budget))
            answers += [normalize_answer(t) for t in out.text]
            kv += out.stats["kv_bytes"]
            kv_full += out.stats["kv_bytes_full"]
        correct = [a == e.answer for a, e in zip(answers, examples)]
        n = len(examples)
        records.append(SweepRecord(name, budget, float(np.mean(correct)), n, kv / n, kv_full / n, answers))
    return records


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
    lines = [f"{'run':<16} {'answer':<24} {'kept text/layer':>16} {'kept vision/layer':>18} {'KV KiB':>8} {'of full':>8}"]
    for label, out in outputs.items():
        s = out.stats
        txt = "/".join(f"{x:g}" for x in s["kept_text_per_layer"])
        vis = "/".join(f"{x:g}" for x in s["kept_vision_per_layer"])
        share = s["kv_bytes"] / max(s["kv_bytes_full"], 1.0)
        answer = out.text[row][:24]
        lines.append(f"{label:<16} {answer!s:<24} {txt:>16} {vis:>18} {s['kv_bytes'] / 1024:>8.1f} {share:>8.0%}")
    return "\n".join(lines)


def records_table(records: Sequence[SweepRecord]) -> str:
    """A text table of `sweep` records: method, budget, accuracy, live KV KiB per prompt."""
    lines = [f"{'method':<14} {'budget':>7} {'accuracy':>9} {'n':>4} {'KV KiB':>8} {'of full':>8}"]
    for r in records:
        budget = "-" if r.budget is None else f"{r.budget:g}"
        lines.append(f"{r.method:<14} {budget:>7} {r.accuracy:>9.2f} {r.n:>4} {r.kv_bytes / 1024:>8.1f} "
                     f"{r.kv_bytes / max(r.kv_bytes_full, 1.0):>8.0%}")
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


def _by_method(records: Sequence[SweepRecord]):
    out: dict[str, list[SweepRecord]] = {}
    for r in records:
        out.setdefault(r.method, []).append(r)
    return out


def plot_accuracy_vs_budget(records: Sequence[SweepRecord], size: tuple[float, float] = (4.5, 3.0)):
    """Exact-match accuracy against budget, one line per method; "full" is a dashed horizontal line."""
    return _plot_vs_budget(records, lambda r: r.accuracy, "exact-match accuracy", size, ylim=(-0.02, 1.02))


def plot_kv_bytes_vs_budget(records: Sequence[SweepRecord], size: tuple[float, float] = (4.5, 3.0)):
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
