"""`python -m vkv_jax.evaluate`: accuracy and fidelity of every method × budget on the synthetic testbed.

For each (method, budget) it answers N seeded test questions and reports
  - exact-match accuracy (overall and per question type),
  - agreement with the full-cache answers (fidelity),
  - answer-patch recall: the share of the visual tokens covering the answer's grid cells that each
    layer kept (averaged over layers, rows and kv heads) — did the method keep the right tokens?
  - live KV bytes as a fraction of the full cache.
Writes `evaluation.json` and PNG plots (accuracy / recall vs KV fraction) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

DEFAULT_METHODS = ("full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "vlcache",
                   "aircache", "csp")
DEFAULT_BUDGETS = (0.05, 0.1, 0.25, 0.5)


@dataclasses.dataclass
class Result:
    method: str
    budget: float | int | None
    accuracy: float
    accuracy_by_type: dict[str, float]
    agreement_with_full: float | None
    answer_patch_recall: float | None
    kv_fraction: float
    answers: list[str]


def normalize_answer(text: str) -> str:
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""


def image_start_positions(input_ids: np.ndarray, valid: np.ndarray, image_token_id: int) -> np.ndarray:
    """[B] original position of each row's first image token (left padding discounted)."""
    first = np.argmax(input_ids == image_token_id, axis=1)
    return first - (~valid).sum(axis=1)


def answer_patch_recall(layout: dict[str, np.ndarray], image_start: np.ndarray,
                        answer_patches: Sequence[Sequence[int]]) -> np.ndarray:
    """[L, B] share of each row's answer patches still live in each layer (mean over kv heads).

    layout: the decode-start cache's {"pos", "tag": [L, B, Hkv, C], "length": [L, B, Hkv]};
    image_start [B]; answer_patches: per row, visual-token indices (raster order) the answer needs.
    Rows without answer patches get NaN.
    """
    pos, tag, length = layout["pos"], layout["tag"], layout["length"]
    L, B, H, C = pos.shape
    live = (np.arange(C) < length[..., None]) & (pos >= 0) & (tag == 1)
    out = np.full((L, B), np.nan)
    for b, patches in enumerate(answer_patches):
        if not len(patches):
            continue
        want = image_start[b] + np.asarray(patches)
        hit = np.isin(pos[:, b], want) & live[:, b]  # [L, H, C]
        out[:, b] = hit.sum(-1).mean(-1) / len(patches)
    return out


def evaluate(model, examples, compressions, *, batch_size: int = 16, max_new_tokens: int = 4,
             progress: bool = True) -> list[Result]:
    """Answer `examples` (testbed Examples) under each Compression; the first should be "full"."""
    from tqdm.auto import tqdm

    import vkv_jax
    from vkv_jax.testbed import synthetic

    cfg = model.config
    patch = cfg.vision.patch_size
    results: list[Result] = []
    full_answers = None
    grid = [(c, i) for c in compressions for i in range(0, len(examples), batch_size)]
    bar = tqdm(total=len(grid), desc="evaluate", disable=not progress)
    for compression in compressions:
        answers, recalls, kv, kv_full = [], [], 0.0, 0.0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            inputs = model.prepare([e.image for e in chunk], [e.question for e in chunk])
            out = vkv_jax.generate(model, inputs, max_new_tokens, compression, return_layout=True)
            answers += [normalize_answer(t) for t in out.text]
            kv += out.stats["kv_bytes"]
            kv_full += out.stats["kv_bytes_full"]
            starts = image_start_positions(inputs.input_ids, inputs.valid, cfg.image_token_id)
            config = synthetic.ShapesConfig(image_size=cfg.vision.image_size)
            patches = [synthetic.cells_to_patches(e.answer_cells, config, patch) for e in chunk]
            recalls.append(answer_patch_recall(out.layout, starts, patches))
            bar.update(1)
        gold = [e.answer for e in examples]
        correct = np.array([a == g for a, g in zip(answers, gold)])
        by_type = {}
        for qtype in sorted({e.qtype for e in examples}):
            sel = np.array([e.qtype == qtype for e in examples])
            by_type[qtype] = float(correct[sel].mean())
        recall = np.concatenate(recalls, axis=1)
        if compression.name == "full":
            full_answers = answers
        agreement = None if full_answers is None else float(np.mean([a == f for a, f in zip(answers, full_answers)]))
        results.append(Result(
            method=compression.name, budget=compression.budget, accuracy=float(correct.mean()),
            accuracy_by_type=by_type, agreement_with_full=agreement,
            answer_patch_recall=float(np.nanmean(recall)) if np.isfinite(recall).any() else None,
            kv_fraction=kv / max(kv_full, 1.0), answers=answers))
    bar.close()
    return results


def table(results: Sequence[Result]) -> str:
    lines = [f"{'method':<13}{'budget':>8}{'accuracy':>10}{'agree':>8}{'recall':>8}{'KV':>7}"]
    for r in results:
        fmt = lambda x: "   -" if x is None else f"{x:.3f}"
        lines.append(f"{r.method:<13}{str(r.budget if r.budget is not None else '-'):>8}{r.accuracy:>10.3f}"
                     f"{fmt(r.agreement_with_full):>8}{fmt(r.answer_patch_recall):>8}{r.kv_fraction:>7.1%}")
    return "\n".join(lines)


def plot(results: Sequence[Result], path: str) -> None:
    """Accuracy and answer-patch recall against the live KV fraction, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vkv_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF LLaVA checkpoint dir (default: the shipped tiny model)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)))
    p.add_argument("--n", type=int, default=200, help="test questions")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--out", default="vkv_jax_out/evaluation")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    import vkv_jax
    from vkv_jax.generate import parse_budget
    from vkv_jax.testbed import synthetic

    methods = [m for m in args.methods.split(",") if m]
    budgets = [parse_budget(b) for b in args.budgets.split(",") if b]
    compressions = [vkv_jax.Compression("full")] if "full" in methods else []
    compressions += [vkv_jax.Compression(m, budget=b) for m in methods if m != "full" for b in budgets]
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model = vkv_jax.load(args.model)
    config = synthetic.ShapesConfig(image_size=model.config.vision.image_size)
    examples = synthetic.make_examples(args.split, args.n, config=config)
    results = evaluate(model, examples, compressions, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens)
    print(table(results))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "evaluation.json"), "w") as f:
        json.dump({"model": model.path, "split": args.split, "n": args.n,
                   "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    plot(results, os.path.join(args.out, "accuracy_vs_kv.png"))
    print(f"wrote {args.out}/evaluation.json and accuracy_vs_kv.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
