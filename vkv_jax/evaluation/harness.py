"""`python -m vkv_jax.evaluate`: accuracy and fidelity of every method × budget (shapes testbed or JSONL).

The questions come from the synthetic shapes testbed or from a JSONL benchmark of your own.

    python -m vkv_jax.evaluate [--model DIR] [--data shapes|FILE.jsonl] [--methods full,snapkv,aircache]
                               [--budgets 0.01,0.05,0.1,0.2] [--limit N] [--out DIR]

For each (method, budget), over the questions:
  - exact-match accuracy of the first answer word (overall and per question type),
  - agreement with the full-cache answers,
  - KL(p_full || p_method) of the first answer token's distribution (mean over questions; 0 for full),
  - answer-patch recall: the share of the visual tokens covering the answer's grid cells that each
    layer kept (mean over layers, rows, kv heads; shapes data only),
  - kept visual and text prompt tokens per layer (mean over layers, rows, kv heads) and live KV bytes.
Then, with the full cache, the checks that the model reads the image: accuracy with every image blank
and with each question given another question's image, the question-only baseline (shapes data), and
how much of the last layer's attention from the last prompt token lands on the asked cell of the
"what shape is at row r column c?" questions, against uniform attention over the visual tokens.
Writes results.json, results.md, accuracy_vs_budget.png and accuracy_vs_kv.png to --out
(`vkv_jax.evaluation.report`). JSONL rows: see `vkv_jax.evaluation.data`.

Protocol (`--suffix 2`, the default): the prompt is prefilled up to the chat template's final
"ASSISTANT:", the cache is compressed, those two tokens go through decode steps, and the answer is
decoded from the compressed cache (with `--suffix 0` a one-word answer comes from the full-attention
prefill logits, which no post-prefill method changes). Each (method, shape) compiles once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax.evaluation.results import Result, accuracy_by_type, normalize_answer

DEFAULT_METHODS = ("full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "vlcache",
                   "aircache", "csp")
DEFAULT_BUDGETS = (0.01, 0.05, 0.1, 0.2)
DEFAULT_SHAPES_LIMIT = 200


def compression_grid(methods: Sequence[str], budgets: Sequence[float | int], *,
                     rejected: dict[str, str] | None = None) -> list:
    """Compressions for every method × budget; "full" once, first. An unknown method raises ValueError;
    a budget that a method rejects (CSP below its recent_ratio) is left out and, when `rejected` is
    given, recorded there as {"method@budget": reason}."""
    from vkv_jax.methods import Compression

    grid = [Compression("full")] if "full" in methods else []
    for m in methods:
        if m == "full":
            continue
        Compression(m)  # the name is checked with the method's default budget
        for b in budgets:
            try:
                grid.append(Compression(m, budget=b))
            except ValueError as e:
                if rejected is not None:
                    rejected[f"{m}@{b:g}"] = str(e)
    return grid


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


def answer_patches(examples: Sequence[Any], cfg) -> list[list[int]]:
    """Per example, the visual-token indices (raster order) covering its `answer_cells` ([] for none)."""
    from vkv_jax.testbed import synthetic

    if not any(e.answer_cells for e in examples):
        return [[] for _ in examples]
    config = synthetic.ShapesConfig(image_size=cfg.vision.image_size)
    return [synthetic.cells_to_patches(e.answer_cells, config, cfg.vision.patch_size) for e in examples]


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """[N] KL(p || q) from log-probabilities [N, V] (float64 sums)."""
    logp, logq = np.asarray(logp, np.float64), np.asarray(logq, np.float64)
    return (np.exp(logp) * (logp - logq)).sum(-1)


# ----------------------------------------------------------------------------- one batch, one method

def _compress_then_answer(params, cfg, method, input_ids, valid, pixel_values, suffix: int,
                          max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int):
    """Prefill all but the prompt's last `suffix` tokens, compress, feed those tokens through decode
    steps, then decode greedily: the answer's first token is read from the compressed cache.

    input_ids, valid [B, S] (left padded); pixel_values [B, C, H, W].
    Returns tokens [B, max_new_tokens]; the first answer token's log-probabilities [B, V] f32 (the
    distribution its greedy pick is made from); the compressed cache's (pos, tag, length); its live KV
    bytes; and `decode.PrefillStats` (full KV bytes, kept text / vision tokens per layer).
    """
    from vkv_jax import decode, pipeline
    from vkv_jax.sampling import Sampling

    S = input_ids.shape[1] - suffix
    logits, cache, pos, pstats = decode.prefill(params, cfg, method, input_ids[:, :S], valid[:, :S],
                                                pixel_values, max_new_tokens + suffix)
    layout, kv = (cache.pos, cache.tag, cache.length), cache.live_bytes()
    if suffix:
        logits, cache, pos = pipeline.feed_tokens(params, cfg, cache, input_ids[:, S:], pos)
    key = jax.random.key(0)
    first, done = decode.first_tokens(logits, key, Sampling(), eos_ids)
    state = decode.DecodeState(cache=cache, tokens=first, positions=pos, done=done)
    tokens, _ = decode.scan_decode(params, cfg, state, key, max_new_tokens, Sampling(), eos_ids, pad_id)
    return tokens, jax.nn.log_softmax(logits.astype(jnp.float32)), layout, kv, pstats


_compress_then_answer_jit = jax.jit(_compress_then_answer, static_argnames=(
    "cfg", "method", "suffix", "max_new_tokens", "eos_ids", "pad_id"))


@dataclasses.dataclass
class BatchAnswer:
    """One batch under one compression, on the host (B rows)."""

    texts: list[str]
    logprobs: np.ndarray  # [B, V] float32 log-probabilities of the first answer token
    layout: dict[str, np.ndarray]  # the compressed cache's {"pos", "tag": [L, B, Hkv, C], "length": [L, B, Hkv]}
    kept: np.ndarray  # [L, 2] kept prompt tokens (text, vision) per layer, mean over rows and kv heads
    kv_bytes: float  # live KV bytes of the whole batch after compression
    kv_bytes_full: float  # ... without compression


def _answer(model, inputs, compression, max_new_tokens: int, suffix: int) -> BatchAnswer:
    """Answer one prepared batch under `compression` (`_compress_then_answer`, jitted)."""
    from vkv_jax.api import check_request
    from vkv_jax.methods import build

    check_request(model, inputs, max_new_tokens)
    eos, pad = tuple(sorted(model.tokenizer.eos_ids)), int(model.tokenizer.pad_id)
    tokens, logprobs, (pos, tag, length), kv, pstats = _compress_then_answer_jit(
        model.params, model.config, build(compression), jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid),
        jnp.asarray(inputs.pixel_values, model.dtype), suffix, max_new_tokens, eos, pad)
    return BatchAnswer(texts=[model.tokenizer.decode_generated(row, eos) for row in np.asarray(tokens)],
                       logprobs=np.asarray(logprobs),
                       layout={"pos": np.asarray(pos), "tag": np.asarray(tag), "length": np.asarray(length)},
                       kept=np.asarray(pstats.kept_per_layer), kv_bytes=float(kv),
                       kv_bytes_full=float(pstats.full_kv_bytes))


# ----------------------------------------------------------------------------- the sweep

def evaluate(model, examples, compressions, *, batch_size: int = 16, max_new_tokens: int = 4,
             suffix: int = 2, progress: bool = True, desc: str = "evaluate") -> list[Result]:
    """Answer `examples` under each Compression; put "full" first (agreement and KL are against it).

    examples: items with `image`, `question`, `answer`, `qtype`, `answer_cells` (testbed Examples or
    `eval_data.Item`s). suffix > 0: compress before the prompt's last `suffix` tokens (2 = the
    template's "ASSISTANT:"), so that even a one-token answer is decoded from the compressed cache.
    """
    from tqdm.auto import tqdm

    from vkv_jax import viz

    cfg = model.config
    patches = answer_patches(examples, cfg)
    starts = range(0, len(examples), batch_size)
    bar = tqdm(total=len(compressions) * len(starts), desc=desc, disable=not progress)
    results, full = [], None
    for compression in compressions:
        batches, recalls = [], []
        for start in starts:
            chunk = examples[start:start + batch_size]
            inputs = model.prepare([e.image for e in chunk], [e.question for e in chunk])
            batch = _answer(model, inputs, compression, max_new_tokens, suffix)
            keep = viz.visual_keep_map(batch.layout, inputs.input_ids, inputs.valid, cfg.image_token_id,
                                       cfg.num_image_tokens)
            recalls.append(answer_patch_recall(keep, patches[start:start + batch_size]))
            batches.append(batch)
            bar.update(1)
        answers = [normalize_answer(t) for b in batches for t in b.texts]
        logprobs = np.concatenate([b.logprobs for b in batches])
        if compression.name == "full" and full is None:
            full = (answers, logprobs)
        results.append(_result(compression, examples, answers, logprobs, np.concatenate(recalls, axis=1),
                               batches, full))
    bar.close()
    return results


def _result(compression, examples, answers: list[str], logprobs: np.ndarray, recall: np.ndarray,
            batches: Sequence[BatchAnswer], full: tuple[list[str], np.ndarray] | None) -> Result:
    """Summarise one compression's answers [N], first-token log-probs [N, V] and recall [L, N]."""
    n = len(examples)
    correct = np.array([a == normalize_answer(e.answer) for a, e in zip(answers, examples)])
    kept = sum(b.kept * len(b.texts) for b in batches).mean(axis=0) / n  # (text, vision)
    agreement = kl = None
    if full is not None:
        agreement = float(np.mean([a == f for a, f in zip(answers, full[0])]))
        kl = float(kl_divergence(full[1], logprobs).mean())
    return Result(
        method=compression.name, budget=compression.budget, n=n, accuracy=float(correct.mean()),
        accuracy_by_type=accuracy_by_type(correct, [e.qtype for e in examples]), agreement_with_full=agreement,
        answer_patch_recall=float(np.nanmean(recall)) if np.isfinite(recall).any() else None,
        kv_bytes=sum(b.kv_bytes for b in batches) / n, kv_bytes_full=sum(b.kv_bytes_full for b in batches) / n,
        answers=answers, kl_first_token=kl, kept_text=float(kept[0]), kept_vision=float(kept[1]))


# ----------------------------------------------------------------------------- does the model read the image?

def image_ablations(model, examples, modes: Sequence[str], **kwargs) -> dict[str, Result]:
    """{mode: full-cache Result} with the images replaced (`synthetic.ablated_images`: "blank",
    "shuffled"); kwargs go to `evaluate`."""
    from vkv_jax.evaluation import data as eval_data
    from vkv_jax.methods import Compression
    from vkv_jax.testbed import synthetic

    size = model.config.vision.image_size
    out = {}
    for mode in modes:
        swapped = eval_data.with_images(examples, synthetic.ablated_images([e.image for e in examples], mode, size))
        out[mode] = evaluate(model, swapped, [Compression("full")], desc=f"images: {mode}", **kwargs)[0]
    return out


def question_only(examples, image_size: int, train_questions: int, seed: int = 0) -> dict[str, Any]:
    """Accuracy on `examples` (shapes) of answering from the question alone: the answer prior of
    `testbed.baselines.question_only_baseline` counted over `train_questions` seeded training questions."""
    from vkv_jax.testbed import baselines, synthetic

    config = synthetic.ShapesConfig(image_size=image_size)
    pool = synthetic.make_examples("train", train_questions, config=config, seed=seed, with_image=False)
    summary = baselines.question_only_baseline(baselines.question_columns(pool), baselines.question_columns(examples))
    accuracy = summary.pop("all")
    return {"train_questions": train_questions, "accuracy": accuracy, "accuracy_by_type": summary}


def layer_attention(params, cfg, input_ids, valid, pixel_values) -> jax.Array:
    """[L, B, S] float32: each LM layer's attention from the last prompt slot over every slot, mean over
    query heads, with the full prompt in the cache. input_ids, valid [B, S] left padded.

    The LM layers run as in the prefill (`llama.prefill_layers`); each layer's post-RoPE q, k go
    through FastV's ranking attention (`fastv.last_token_attention`).
    """
    from vkv_jax.methods.fastv import last_token_attention
    from vkv_jax.models import llama, llava

    x, _ = llava.merge_embeddings(params, cfg, input_ids, pixel_values)
    *_, attention = llama.prefill_layers(params["lm"], cfg.text, x, llava.positions_from_mask(valid), valid,
                                         observe=lambda q, k: last_token_attention(q, k, valid))
    return attention


_layer_attention_jit = jax.jit(layer_attention, static_argnames=("cfg",))


def cell_attention(attention: np.ndarray, input_ids: np.ndarray, image_token_id: int,
                   patches: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row b: (attention mass on `patches[b]`, the mass uniform attention over the row's visual
    tokens would put there = len(patches[b]) / n_visual, the mass on all visual tokens), each [B].

    attention [B, S] over slots (one layer of `layer_attention`); input_ids [B, S]; patches: visual-token
    indices in raster order (the order of the image tokens in the row).
    """
    mass, uniform, visual = (np.zeros(len(patches)) for _ in range(3))
    for b, cell in enumerate(patches):
        on_image = np.asarray(attention[b])[np.asarray(input_ids[b]) == image_token_id]
        mass[b] = on_image[np.asarray(cell, int)].sum()
        uniform[b] = len(cell) / on_image.size
        visual[b] = on_image.sum()
    return mass, uniform, visual


def attention_concentration(model, examples, batch_size: int = 16) -> dict[str, Any] | None:
    """For the "what shape is at row r column c?" examples (qtype shape_at with answer cells): mean
    last-layer attention mass of the last prompt token on the asked cell's patches, as a multiple of
    uniform attention over the visual tokens and raw, the mass on all visual tokens, and the multiple of
    uniform in every layer (`times_uniform_by_layer`). None when there are no such examples."""
    asked = [e for e in examples if e.qtype == "shape_at" and e.answer_cells]
    if not asked:
        return None
    cfg = model.config
    patches = answer_patches(asked, cfg)
    parts = []  # per batch: (mass, uniform, visual), each [L, B]
    for start in range(0, len(asked), batch_size):
        chunk = asked[start:start + batch_size]
        inputs = model.prepare([e.image for e in chunk], [e.question for e in chunk])
        attention = np.asarray(_layer_attention_jit(model.params, cfg, jnp.asarray(inputs.input_ids),
                                                    jnp.asarray(inputs.valid),
                                                    jnp.asarray(inputs.pixel_values, model.dtype)))
        per_layer = [cell_attention(a, inputs.input_ids, cfg.image_token_id, patches[start:start + batch_size])
                     for a in attention]
        parts.append(tuple(np.stack(x) for x in zip(*per_layer)))
    mass, uniform, visual = (np.concatenate(p, axis=1) for p in zip(*parts))
    by_layer = (mass / uniform).mean(axis=1)
    return {"questions": len(asked), "cell_mass": float(mass[-1].mean()), "uniform_mass": float(uniform[-1].mean()),
            "times_uniform": float(by_layer[-1]), "visual_mass": float(visual[-1].mean()),
            "times_uniform_by_layer": [round(float(x), 3) for x in by_layer]}


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from vkv_jax.cli.common import HelpFormatter, at_least, description

    p = argparse.ArgumentParser(prog="python -m vkv_jax.evaluate", description=description(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="HF LLaVA checkpoint folder (default: the shipped tiny model)")
    p.add_argument("--data", default="shapes",
                   help='"shapes" (seeded synthetic questions of --split) or a JSONL file of {"image", "question", '
                        '"answer"[, "qtype"]} rows, image paths relative to the file')
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="testbed split the shapes questions come from")
    p.add_argument("--limit", "--n", dest="limit", type=at_least(1), default=None,
                   help=f"questions (default: {DEFAULT_SHAPES_LIMIT} shapes questions, every JSONL row); "
                        "--n is a deprecated alias")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list of compression methods (vkv_jax.methods.available()); full runs once, "
                        "first, as the reference")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="comma list of budgets, each a ratio in (0, 1] (of what the method's budget is a "
                        "fraction of: see python -m vkv_jax.generate --help) or an integer token count > 1; "
                        "a budget a method rejects is reported as not run")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="questions per batch")
    p.add_argument("--max-new-tokens", type=at_least(1), default=4, help="greedy tokens per answer")
    p.add_argument("--suffix", type=at_least(0), default=2,
                   help="prompt tokens fed after compression (2 = the template's 'ASSISTANT:'), so a one-word "
                        "answer is read from the compressed cache; 0 = answer from the prefill logits")
    p.add_argument("--ablations", default="blank,shuffled",
                   help='comma list of full-cache runs with the images replaced: blank and/or shuffled ("" = none)')
    p.add_argument("--prior-questions", type=at_least(0), default=20000,
                   help="seeded training questions the question-only baseline counts (shapes data; 0 = skip)")
    p.add_argument("--out", default="vkv_jax_out/evaluation",
                   help="folder for results.json, results.md and the plots (created if missing)")
    return p


def main(argv: list[str] | None = None) -> int:
    from vkv_jax.cli.common import run_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python -m vkv_jax.evaluate", *argv])
    return run_cli(_main, args)


def _check_args(args) -> tuple[list, dict[str, str], list[str]]:
    """Every check that needs no model: raises ValueError / FileNotFoundError naming the flag.
    Returns (the compressions to run, the rejected cells {"method@budget": reason}, the ablation modes)."""
    from vkv_jax.cli.common import check_input_file, check_model_dir, check_out_dir, parse_budgets, parse_names
    from vkv_jax.methods import available
    from vkv_jax.testbed.synthetic import ABLATIONS

    check_model_dir(args.model)
    check_out_dir(args.out)
    if args.data != "shapes":
        check_input_file(args.data, "--data", "'shapes' or a JSONL file")
    methods = parse_names(args.methods, "--methods", available())
    budgets = parse_budgets(args.budgets)
    if not budgets and any(m != "full" for m in methods):
        raise ValueError("--budgets is empty; expected a comma list of budgets, e.g. 0.05,0.1")
    modes = [m.strip() for m in args.ablations.split(",") if m.strip()]
    bad = [m for m in modes if m not in ABLATIONS]
    if bad:
        raise ValueError(f"unknown --ablations {', '.join(map(repr, bad))}; allowed: {', '.join(ABLATIONS)}")
    rejected: dict[str, str] = {}
    compressions = compression_grid(methods, budgets, rejected=rejected)
    if not compressions:
        reasons = "; ".join(f"{cell}: {why}" for cell, why in rejected.items())
        raise ValueError(f"no method x budget cell can run ({reasons}); give budgets the methods accept "
                         "(or add full to --methods)")
    return compressions, rejected, modes


def _main(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import vkv_jax
    from vkv_jax.evaluation import data as eval_data
    from vkv_jax.evaluation import report as eval_report

    compressions, rejected, modes = _check_args(args)
    shapes = args.data == "shapes"
    examples = None if shapes else eval_data.load_jsonl(args.data, args.limit)  # bad files fail before loading
    model = vkv_jax.load(args.model)
    size = model.config.vision.image_size
    if shapes:
        examples = eval_data.shapes(args.split, args.limit or DEFAULT_SHAPES_LIMIT, size)
    run = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, suffix=args.suffix)
    results = evaluate(model, examples, compressions, **run)
    checks = {"ablations": image_ablations(model, examples, modes, **run),
              "question_only_baseline": (question_only(examples, size, args.prior_questions)
                                         if shapes and args.prior_questions else None),
              "attention": attention_concentration(model, examples, args.batch_size)}
    config = dict(eval_report.run_config(args, model), not_run=rejected)
    report = eval_report.Report(config, examples, results, **checks)
    print(eval_report.markdown(report))
    written = eval_report.write(args.out, report)
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0
