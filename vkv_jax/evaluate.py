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
import re
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_METHODS = ("full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "vlcache",
                   "aircache", "csp")
DEFAULT_BUDGETS = (0.05, 0.1, 0.25, 0.5)


@dataclasses.dataclass
class Result:
    method: str
    budget: float | int | None
    n: int
    accuracy: float  # exact match of the first answer word
    accuracy_by_type: dict[str, float]
    agreement_with_full: float | None
    answer_patch_recall: float | None
    kv_bytes: float  # mean live KV bytes per prompt after compression
    kv_bytes_full: float  # mean live KV bytes per prompt without compression
    answers: list[str]

    @property
    def kv_fraction(self) -> float:
        return self.kv_bytes / max(self.kv_bytes_full, 1.0)


def normalize_answer(text: str) -> str:
    """First word, lower case, punctuation stripped ('Red.' -> 'red'); '' for an empty answer."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def compression_grid(methods: Sequence[str], budgets: Sequence[float | int]) -> list:
    """Compressions for every method × budget; "full" once, first."""
    from vkv_jax.methods import Compression

    grid = [Compression("full")] if "full" in methods else []
    return grid + [Compression(m, budget=b) for m in methods if m != "full" for b in budgets]


def answer_patch_recall(keep: np.ndarray, answer_patches: Sequence[Sequence[int]]) -> np.ndarray:
    """[L, B] share of each row's answer patches still held in each layer.

    keep: `viz.visual_keep_map(...)` [L, B, num_visual] (fraction of kv heads keeping each visual token);
    answer_patches: per row, the visual-token indices (raster order) the answer needs. Rows without
    answer patches get NaN.
    """
    out = np.full(keep.shape[:2], np.nan)
    for b, patches in enumerate(answer_patches):
        if len(patches):
            out[:, b] = keep[:, b, np.asarray(patches)].mean(-1)
    return out


def _compress_then_answer(params, cfg, method, input_ids, valid, pixel_values, suffix: int,
                          max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int):
    """Prefill all but the prompt's last `suffix` tokens, compress, feed those tokens through decode
    steps, then decode greedily: the answer's first token is read from the compressed cache.

    (With `suffix=0` the first answer token comes from the full-attention prefill logits, which no
    post-prefill method changes — one-word answers then cannot tell methods apart.)
    Returns tokens [B, max_new_tokens], the compressed cache's (pos, tag, length), live and full KV bytes.
    """
    from vkv_jax import decode, pipeline
    from vkv_jax.sampling import Sampling

    _, cache, pos, pstats = decode.prefill(params, cfg, method, input_ids[:, :-suffix], valid[:, :-suffix],
                                           pixel_values, max_new_tokens + suffix)
    layout, kv = (cache.pos, cache.tag, cache.length), cache.live_bytes()
    logits, cache, pos = pipeline.feed_tokens(params, cfg, cache, input_ids[:, -suffix:], pos)
    key = jax.random.key(0)
    first, done = decode.first_tokens(logits, key, Sampling(), eos_ids)
    state = decode.DecodeState(cache=cache, tokens=first, positions=pos, done=done)
    tokens, _ = decode.scan_decode(params, cfg, state, key, max_new_tokens, Sampling(), eos_ids, pad_id)
    return tokens, layout, kv, pstats.full_kv_bytes


_compress_then_answer_jit = jax.jit(_compress_then_answer, static_argnames=(
    "cfg", "method", "suffix", "max_new_tokens", "eos_ids", "pad_id"))


def _answer(model, inputs, compression, max_new_tokens: int, suffix: int):
    """(answer texts, host layout dict, live KV bytes, full KV bytes) for one batch."""
    import vkv_jax
    from vkv_jax.api import _detokenize
    from vkv_jax.methods import build

    if suffix == 0:
        out = vkv_jax.generate(model, inputs, max_new_tokens, compression, return_layout=True)
        return out.text, out.layout, out.stats["kv_bytes"], out.stats["kv_bytes_full"]
    eos, pad = tuple(sorted(model.tokenizer.eos_ids)), int(model.tokenizer.pad_id)
    tokens, (pos, tag, length), kv, kv_full = _compress_then_answer_jit(
        model.params, model.config, build(compression), jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid),
        jnp.asarray(inputs.pixel_values, model.dtype), suffix, max_new_tokens, eos, pad)
    texts = [_detokenize(model.tokenizer, row, eos) for row in np.asarray(tokens)]
    layout = {"pos": np.asarray(pos), "tag": np.asarray(tag), "length": np.asarray(length)}
    return texts, layout, float(kv), float(kv_full)


def evaluate(model, examples, compressions, *, batch_size: int = 16, max_new_tokens: int = 4,
             suffix: int = 0, progress: bool = True) -> list[Result]:
    """Answer `examples` (testbed Examples) under each Compression; the first should be "full".

    suffix > 0: compress before the prompt's last `suffix` tokens (e.g. 2 = the template's
    "ASSISTANT:"), so that even a one-token answer is decoded from the compressed cache.
    """
    from tqdm.auto import tqdm

    from vkv_jax import viz
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
            texts, layout, kv_b, kv_full_b = _answer(model, inputs, compression, max_new_tokens, suffix)
            answers += [normalize_answer(t) for t in texts]
            kv += kv_b
            kv_full += kv_full_b
            keep = viz.visual_keep_map(layout, inputs.input_ids, inputs.valid, cfg.image_token_id,
                                       cfg.num_image_tokens)
            config = synthetic.ShapesConfig(image_size=cfg.vision.image_size)
            patches = [synthetic.cells_to_patches(e.answer_cells, config, patch) for e in chunk]
            recalls.append(answer_patch_recall(keep, patches))
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
        n = len(examples)
        results.append(Result(
            method=compression.name, budget=compression.budget, n=n, accuracy=float(correct.mean()),
            accuracy_by_type=by_type, agreement_with_full=agreement,
            answer_patch_recall=float(np.nanmean(recall)) if np.isfinite(recall).any() else None,
            kv_bytes=kv / n, kv_bytes_full=kv_full / n, answers=answers))
    bar.close()
    return results


def table(results: Sequence[Result]) -> str:
    lines = [f"{'method':<13}{'budget':>8}{'accuracy':>10}{'agree':>8}{'recall':>8}{'KV':>7}"]
    for r in results:
        fmt = lambda x: "   -" if x is None else f"{x:.3f}"
        lines.append(f"{r.method:<13}{str(r.budget if r.budget is not None else '-'):>8}{r.accuracy:>10.3f}"
                     f"{fmt(r.agreement_with_full):>8}{fmt(r.answer_patch_recall):>8}{r.kv_fraction:>7.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vkv_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF LLaVA checkpoint dir (default: the shipped tiny model)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)))
    p.add_argument("--n", type=int, default=200, help="test questions")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--suffix", type=int, default=2,
                   help="prompt tokens fed after compression (2 = the template's 'ASSISTANT:'), so a one-word "
                        "answer is read from the compressed cache; 0 = answer from the prefill logits")
    p.add_argument("--out", default="vkv_jax_out/evaluation")
    from vkv_jax.generate import run_cli

    return run_cli(_main, p.parse_args(argv))


def _main(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import vkv_jax
    from vkv_jax import viz
    from vkv_jax.generate import parse_budget
    from vkv_jax.testbed import synthetic

    compressions = compression_grid([m for m in args.methods.split(",") if m],
                                    [parse_budget(b) for b in args.budgets.split(",") if b])
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model = vkv_jax.load(args.model)
    config = synthetic.ShapesConfig(image_size=model.config.vision.image_size)
    examples = synthetic.make_examples(args.split, args.n, config=config)
    if args.suffix < 0:
        raise ValueError(f"--suffix must be >= 0, got {args.suffix}")
    results = evaluate(model, examples, compressions, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, suffix=args.suffix)
    print(table(results))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "evaluation.json"), "w") as f:
        json.dump({"model": model.path, "split": args.split, "n": args.n, "gold": [e.answer for e in examples],
                   "results": [dict(dataclasses.asdict(r), kv_fraction=r.kv_fraction) for r in results]}, f, indent=1)
    fig = viz.plot_accuracy_vs_kv(results)
    fig.savefig(os.path.join(args.out, "accuracy_vs_kv.png"), dpi=110)
    print(f"wrote {args.out}/evaluation.json and accuracy_vs_kv.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
