"""`python -m vkv_jax.evaluate`: accuracy and fidelity of every method at equal live KV (shapes testbed or JSONL).

The questions come from the synthetic shapes testbed or from a JSONL benchmark of your own.

    python -m vkv_jax.evaluate [--model DIR] [--data shapes|FILE.jsonl] [--methods full,snapkv,aircache]
                               [--kv-grid 5,10,15,20,30,50 | --budgets 0.05,0.1] [--protocols ...]
                               [--limit N] [--out DIR]

Budgets mean different things per method, so by default each method is run at the budget whose
*measured* live KV share hits each point of --kv-grid within 0.5 points (`kv_grid.solve`; a point below
the method's floor is marked unreachable), beside reference rows at the same share (text only, recency
only, text + random visual tokens; `references`). Under each protocol of --protocols (`protocols`:
pre-template, template, multi-turn), for each (method, share), over the questions:
  - accuracy: the mean score of each question's metric (`metrics`: exact match of the whole normalised
    answer for the testbed; exact, VQAv2 soft accuracy, ANLS or multiple-choice letter for JSONL rows, by
    --metric or per row), overall and per question type, with its 95% Wilson interval (soft scores: with
    their sum for k, conservative, `Result.ci95`), and the exact McNemar test against SnapKV at the same
    share (`stats`; a question counts as right when it scores at least 0.5),
  - agreement with the full-cache answers,
  - KL(p_full || p_method) of the first answer token's distribution (mean over questions; 0 for full),
  - answer-patch recall: the share of the visual tokens covering the answer's grid cells that each
    layer kept (mean over layers, rows, kv heads; shapes data only; under anyres tiling the tokens of
    every grid of the image, base crop and tiles: `grid_tokens_on_cells`),
  - kept visual and text prompt tokens per layer (mean over layers, rows, kv heads) and live KV bytes.
With --budgets the methods run at the given budgets instead (the table by budget). Then, with the full
cache, the checks that the model reads the image: accuracy with every image blank and with each question
given another question's image, the question-only baseline (shapes data), and how much of the last
layer's attention from the last prompt token lands on the asked cell of the "what shape is at row r
column c?" questions, against uniform attention over the visual tokens. Writes results.json, results.md
and the plots to --out (`vkv_jax.evaluation.report`). JSONL rows: see `vkv_jax.evaluation.data`.
Each (method, protocol) compiles once (the budget is traced where the method allows; CSP, FastV and
LightKV compile per budget). Any model `vkv_jax.load` returns runs (LLaVA-1.5, LLaVA-NeXT, OneVision,
Qwen2-VL): images go through `model.prepare`, and the shapes testbed draws them at `shapes_image_size`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import kv_quant
from vkv_jax.evaluation import data as eval_data
from vkv_jax.evaluation import kv_grid, metrics, protocols, stats
from vkv_jax.evaluation.metrics import normalize_answer
from vkv_jax.evaluation.results import SENSITIVE_SHARE, Result, accuracy_by_type

DEFAULT_METHODS = ("full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "vlcache",
                   "aircache", "csp", "lightkv", "fastv")
DEFAULT_TURNS = 4
DEFAULT_SHAPES_LIMIT = 200
MIN_CELL_PX = 6  # the shapes testbed's smallest cell (`synthetic.ShapesConfig`)


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


def grid_tokens_on_cells(cells: Sequence[tuple[int, int]], cell_grid: int, regions) -> list[int]:
    """The visual ordinals of every token of `regions` whose patch overlaps one of `cells`.

    cells: (row, col) on a `cell_grid` x `cell_grid` grid over the image; regions: one row's image grids
    (`models.anyres.row_regions`), each taken to span the whole image (a LLaVA-1.5 patch grid, an anyres
    base crop, an unpadded tile grid, a Qwen2-VL merged-patch grid), so grid cell (i, j) of a rows x cols
    grid covers [i / rows, (i + 1) / rows) x [j / cols, (j + 1) / cols) of it. A patch grid that is a
    multiple of the cell grid gives `synthetic.cells_to_patches`'s k x k patches per cell.
    """
    from vkv_jax.models import anyres

    out = set()
    for region in regions:
        tokens, rows, cols = anyres.region_tokens(region), region[1], region[2]
        for cr, cc in cells:
            # integer overlap test of [i / rows, (i + 1) / rows) with [cr / g, (cr + 1) / g), and likewise for columns
            i = [i for i in range(rows) if i * cell_grid < (cr + 1) * rows and (i + 1) * cell_grid > cr * rows]
            j = [j for j in range(cols) if j * cell_grid < (cc + 1) * cols and (j + 1) * cell_grid > cc * cols]
            out.update(int(t) for t in tokens[np.ix_(i, j)].ravel())
    return sorted(out)


def answer_patches(examples: Sequence[Any], layouts, cell_grid: int | None = None) -> list[list[int]]:
    """Per example, the visual ordinals of the tokens covering its `answer_cells` (on the testbed's
    `cell_grid` x `cell_grid` cells; None: the shapes testbed's 8) in every grid of its image
    (`grid_tokens_on_cells`); [] for none. layouts: the examples' `Inputs.layouts` rows, in order."""
    from vkv_jax.models import anyres
    from vkv_jax.testbed import synthetic

    cell_grid = cell_grid or synthetic.ShapesConfig().grid
    return [grid_tokens_on_cells(e.answer_cells, cell_grid, anyres.row_regions(lays)) if e.answer_cells else []
            for e, lays in zip(examples, layouts, strict=True)]


def shapes_config(model):
    """The shapes testbed config to ask `model`: the one it was trained on (its `testbed.json`, as
    `vkv_jax.testbed.train` exports), else the default testbed drawn at `shapes_image_size`."""
    from vkv_jax.testbed import synthetic

    return synthetic.config_for_model(model.path, shapes_image_size(model.config))


def shapes_image_size(cfg) -> int:
    """The size the shapes testbed draws its images at for a model: the vision tower's input size, so no
    resize blurs a cell (the smallest multiple of it the testbed can draw, 48 px at least, when it is
    smaller); 128 for a native-resolution tower (Qwen2-VL), which takes the image as drawn."""
    from vkv_jax.testbed import synthetic

    size = getattr(cfg.vision, "image_size", None)
    if size is None:
        return synthetic.ShapesConfig().image_size
    grid = synthetic.ShapesConfig().grid
    k = 1
    while (k * size) % grid or k * size // grid < MIN_CELL_PX:
        k += 1
    return k * size



def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """[N] KL(p || q) from log-probabilities [N, V] (float64 sums)."""
    logp, logq = np.asarray(logp, np.float64), np.asarray(logq, np.float64)
    return (np.exp(logp) * (logp - logq)).sum(-1)


# ----------------------------------------------------------------------------- one batch, one method

@dataclasses.dataclass
class BatchAnswer:
    """One batch under one compression, on the host (B rows)."""

    texts: list[str]
    logprobs: np.ndarray  # [B, V] float32 log-probabilities of the first answer token
    layout: dict[str, np.ndarray]  # the compressed cache's {"pos", "tag": [L, B, Hkv, C], "length": [L, B, Hkv]}
    kept: np.ndarray  # [L, 2] kept prompt tokens (text, vision) per layer, mean over rows and kv heads
    kv_bytes: float  # live KV bytes of the whole batch when the first answer token is read
    kv_bytes_full: float  # ... with the full cache (`protocols`)


def _answer(model, inputs, method, max_new_tokens: int, protocol: str = "pre-template", items=None,
            suffix: int = protocols.TEMPLATE_TOKENS, fed_width: int | None = None,
            kv_dtype: str | None = None, evidence: np.ndarray | None = None) -> BatchAnswer:
    """Answer one prepared batch under `method` (a Compression or a method object) and `protocol`
    (`protocols.answer_batch`, jitted; the budget is traced where the method allows, so one executable
    serves many budgets). items: the batch's examples (multi-turn: their follow-ups are fed).
    evidence: [B, P] bool, each row's evidence tokens, bound with the traced budget (`references.OracleEvidence`)."""
    from vkv_jax.checks import check_request
    from vkv_jax.inputs import bind_visual_layout, device_images, visual_token_bound
    from vkv_jax.methods import Compression, build, split_budget

    if isinstance(method, Compression):
        method = build(method)
    method = bind_visual_layout(method, model.config, inputs)  # LightKV: each row's image grids
    visual_token_bound(model.config, inputs, method)  # FastV / LightKV with rows of differing counts: ValueError
    fed, alive = protocols.fed_tokens(model.tokenizer, items, inputs.input_ids, protocol, fed_width, suffix)
    check_request(model, inputs, max_new_tokens + fed.shape[1])
    prefilled = inputs.input_ids.shape[1] - (fed.shape[1] if protocol == "pre-template" else 0)
    # one executable per method for every budget: capacity for the whole prompt (the share is measured
    # from the live slots, which the capacity does not change)
    static, budget = split_budget(method, prefilled, one_executable=True)
    if evidence is not None:
        from vkv_jax.evaluation import references

        budget = references.bind_evidence(budget, evidence)
    eos, pad = tuple(sorted(model.tokenizer.eos_ids)), int(model.tokenizer.pad_id)
    tokens, logprobs, (pos, tag, length), kv, kv_full, kept = protocols.answer_batch_jit(
        model.params, model.config, static, budget, jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid),
        device_images(inputs.pixel_values, model.dtype), jnp.asarray(fed), jnp.asarray(alive), protocol=protocol,
        max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad, kv_dtype=kv_dtype)
    return BatchAnswer(texts=[model.tokenizer.decode_generated(row, eos) for row in np.asarray(tokens)],
                       logprobs=np.asarray(logprobs),
                       layout={"pos": np.asarray(pos), "tag": np.asarray(tag), "length": np.asarray(length)},
                       kept=np.asarray(kept), kv_bytes=float(kv), kv_bytes_full=float(kv_full))


# ----------------------------------------------------------------------------- one method over the questions

@dataclasses.dataclass
class Run:
    """One method (one budget) over every question, on the host."""

    answers: list[str]  # normalised
    texts: list[str]  # as generated (the metrics score these)
    logprobs: np.ndarray  # [N, V]
    recall: np.ndarray  # [L, N] answer-patch recall
    batches: list[BatchAnswer]

    @property
    def share(self) -> float:
        """Measured live KV share: live bytes / full bytes, summed over every question."""
        return sum(b.kv_bytes for b in self.batches) / max(sum(b.kv_bytes_full for b in self.batches), 1.0)


class Runner:
    """Answers `examples` under any method with one protocol; each batch's inputs are prepared once."""

    def __init__(self, model, examples, *, batch_size: int = 16, max_new_tokens: int = 4,
                 protocol: str = "pre-template", suffix: int = protocols.TEMPLATE_TOKENS, progress: bool = True,
                 kv_dtype: str | None = None, cell_grid: int | None = None):
        self.model, self.examples, self.max_new_tokens = model, examples, max_new_tokens
        self.kv_dtype = kv_quant.check_platform(kv_dtype)  # every method's cache stored in this format
        self.protocol, self.suffix, self.progress = protocols.check_protocol(protocol), suffix, progress
        self.chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        self.inputs = [model.prepare([e.image for e in c], [e.question for e in c]) for c in self.chunks]
        self.patches = [p for c, inputs in zip(self.chunks, self.inputs)
                        for p in answer_patches(c, inputs.layouts, cell_grid)]
        self.fed_width = None
        if protocol == "multi-turn":  # one width for every batch: one executable
            self.fed_width = max(protocols.fed_tokens(model.tokenizer, c, None, protocol)[0].shape[1]
                                 for c in self.chunks)

    def run(self, method) -> Run:
        from vkv_jax import viz
        from vkv_jax.evaluation import references

        cfg, batches, recalls, start = self.model.config, [], [], 0
        for chunk, inputs in zip(self.chunks, self.inputs):
            patches = self.patches[start:start + len(chunk)]
            evidence = (references.evidence_mask(patches, max(inputs.visual_tokens))
                        if isinstance(method, references.OracleEvidence) else None)
            batch = _answer(self.model, inputs, method, self.max_new_tokens, self.protocol, chunk, self.suffix,
                            self.fed_width, self.kv_dtype, evidence)
            keep = viz.visual_keep_map(batch.layout, inputs.input_ids, inputs.valid, cfg.image_token_id,
                                       max(inputs.visual_tokens))
            recalls.append(answer_patch_recall(keep, patches))
            batches.append(batch)
            start += len(chunk)
        texts = [t for b in batches for t in b.texts]
        return Run(answers=[normalize_answer(t) for t in texts], texts=texts,
                   logprobs=np.concatenate([b.logprobs for b in batches]), recall=np.concatenate(recalls, axis=1),
                   batches=batches)


# ----------------------------------------------------------------------------- the sweep

def evaluate(model, examples, compressions, *, batch_size: int = 16, max_new_tokens: int = 4,
             suffix: int = 2, protocol: str = "pre-template", progress: bool = True,
             desc: str = "evaluate", kv_dtype: str | None = None) -> list[Result]:
    """Answer `examples` under each Compression; put "full" first (agreement and KL are against it).

    examples: items with `image`, `question`, `answer`, `qtype`, `answer_cells` (testbed Examples,
    `eval_data.Item`s, or `protocols.TurnItem`s for multi-turn). protocol: see `protocols`; with
    pre-template, suffix > 0 tokens (2 = the template's "ASSISTANT:") are fed after compression, so that
    even a one-token answer is decoded from the compressed cache (suffix 0: from the prefill logits).
    kv_dtype: every run's cache stored quantized (`kv_quant`), the full cache's too.
    """
    from tqdm.auto import tqdm

    runner = Runner(model, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, protocol=protocol,
                    suffix=suffix, kv_dtype=kv_dtype)
    results, full = [], None
    for compression in tqdm(compressions, desc=desc, disable=not progress):
        run = runner.run(compression)
        if compression.name == "full" and full is None:
            full = run
        results.append(_result(compression.name, compression.budget, examples, run, full, protocol=protocol))
    return results


REFERENCE = "snapkv"  # the paired test's other side at every grid point


def lowest_budget(name: str) -> float | None:
    """The smallest ratio budget the solver tries for a method (`Method.lowest_ratio`: 0.005, CSP's
    `recent_ratio`); None for a method that takes no budget (LightKV: its schedule sets the compression)."""
    from vkv_jax.methods import Compression, build

    return build(Compression(name)).lowest_ratio()


def free_executables() -> None:
    """Drop every compiled executable (JAX's jit caches and `compile_cache`). A method's executables serve
    only its own grid (the method is a static argument), and a whole evaluation compiles thousands:
    kept, their code mappings ran the process out of memory maps ("LLVM ERROR: Unable to allocate section
    memory") late in a three-protocol run."""
    from vkv_jax import compile_cache

    compile_cache.clear()
    jax.clear_caches()


def evaluate_grid(runner: Runner, names: Sequence[str], targets: Sequence[float], *, references: bool = True,
                  tol: float = kv_grid.TOLERANCE, progress: bool = True) -> list[Result]:
    """The equal-KV table of one protocol: full, then each method (and the reference rows) at the budget
    whose measured live KV share hits each target (`kv_grid.solve`; every probe answers every question),
    with the exact McNemar test against SnapKV where both hit the same grid point. Rows whose SnapKV-family window held
    all they kept (mean over layers) are noted "= recency"."""
    from tqdm.auto import tqdm

    from vkv_jax.evaluation import references as refs
    from vkv_jax.methods import Compression, build

    examples, protocol = runner.examples, runner.protocol
    full = runner.run(Compression("full"))
    out = [_result("full", None, examples, full, full, protocol=protocol)]
    rows = [(n, (lambda b, n=n: build(Compression(n, budget=b))), lowest_budget(n)) for n in names if n != "full"]
    if references:
        rows += [(n, (lambda b, n=n: refs.reference_method(n, b)), None if n in refs.FIXED_SHARE else 0.005)
                 for n in reference_rows(runner)]
    solved: dict[str, dict[float, tuple[Result, np.ndarray]]] = {}
    for name, make, lo in tqdm(rows, desc=f"equal KV ({protocol})", disable=not progress):
        runs: dict[float, Run] = {}

        def measure(b, make=make, runs=runs):
            runs[b] = runner.run(make(b))
            return runs[b].share

        if lo is None:  # no budget: one share, the method's own
            points = [kv_grid.GridPoint(None, None, measure(None), "fixed")]
        else:
            points = kv_grid.solve(measure, targets, lo, tol=tol)
        solved[name] = {}
        for gp in points:
            r = _result(name, gp.budget, examples, runs[gp.budget], full, protocol=protocol, target=gp.target,
                        status=gp.status)
            window = make(gp.budget).protected_window()
            if window is not None and r.kept_text + r.kept_vision <= window + 1e-6:
                r.note = "= recency"
            solved[name][gp.target] = (r, correct_answers(examples, runs[gp.budget].texts))
            out.append(r)
        free_executables()
    mark_sensitive(out, examples)
    for name, points in solved.items():  # paired only where both hit the same share (a floor is another share)
        for target, (r, right) in points.items():
            other = solved.get(REFERENCE, {}).get(target)
            if r.status == "hit" and name != REFERENCE and other is not None and other[0].status == "hit":
                r.vs_snapkv = dict(stats.mcnemar_exact(right, other[1]), snapkv_accuracy=other[0].accuracy,
                                   snapkv_status=other[0].status)
    return out


def mark_sensitive(results: Sequence[Result], examples) -> np.ndarray | None:
    """Set each result's accuracy on the compression-sensitive subset (`SENSITIVE_SHARE`): the questions
    the full cache (results[0]) answers right and "text + random visual" at that share answers wrong.
    Right / wrong: score >= 0.5 (`correct_answers`); the subset's accuracy is the mean score on it.
    Returns the subset [N] bool, or None when that reference row did not hit the share."""
    random_row = [r for r in results if r.method == "text + random visual" and r.target == SENSITIVE_SHARE
                  and r.status == "hit"]
    if not random_row or results[0].method != "full":
        return None

    def texts(r):  # the generated answers where recorded (non-exact metrics), else the normalised ones
        return r.texts if r.texts is not None else r.answers

    subset = correct_answers(examples, texts(results[0])) & ~correct_answers(examples, texts(random_row[0]))
    for r in results:
        scores = question_scores(examples, texts(r))[subset]
        r.sensitive = {"n": int(subset.sum()), "accuracy": float(scores.mean()) if subset.any() else None}
    return subset


def reference_rows(runner: Runner) -> list[str]:
    """The reference rows that apply to the runner's questions and model: "oracle evidence" where the
    questions know their evidence tokens (the testbeds), the pooled rows where every row's image is one
    square grid of visual tokens (`references.PooledVisual`), the others always."""
    from vkv_jax.evaluation import references as refs

    counts = {n for inputs in runner.inputs for n in inputs.visual_tokens}
    one_square_grid = (runner.model.config.fixed_image_grid and len(counts) == 1
                       and all(len(row) == 1 for inputs in runner.inputs for row in inputs.layouts)
                       and math.isqrt(next(iter(counts))) ** 2 == next(iter(counts)))
    out = []
    for name in refs.REFERENCES:
        if name == "oracle evidence" and not any(runner.patches):
            continue
        if name.startswith("pooled visual") and not one_square_grid:
            continue
        out.append(name)
    return out


def question_scores(examples, texts: Sequence[str]) -> np.ndarray:
    """[N] float: each generated answer's score in [0, 1] under its question's metric and references
    (`data.scoring`, `metrics.score`)."""
    out = []
    for e, text in zip(examples, texts, strict=True):
        metric, references, choices = eval_data.scoring(e)
        out.append(metrics.score(metric, text, references, choices))
    return np.array(out, dtype=np.float64)


def correct_answers(examples, texts: Sequence[str]) -> np.ndarray:
    """[N] bool: which generated answers count as right, score >= 0.5 (the paired tests' reading of a soft
    metric: VQAv2 at least 2 of 10 humans, ANLS within its threshold; exact and choice score 0 or 1)."""
    return question_scores(examples, texts) >= 0.5


def _result(method: str, budget, examples, run: Run, full: Run | None, **extra) -> Result:
    """Summarise one run's answers [N], first-token log-probs [N, V] and recall [L, N]."""
    n = len(examples)
    scores = question_scores(examples, run.texts)
    metric = eval_data.metric_name(examples)
    record = metric != "exact"  # then the per-question scores and generated answers go into the Result
    kept = sum(b.kept * len(b.texts) for b in run.batches).mean(axis=0) / n  # (text, vision)
    agreement = kl = None
    if full is not None:
        agreement = float(np.mean([a == f for a, f in zip(run.answers, full.answers)]))
        kl = float(kl_divergence(full.logprobs, run.logprobs).mean())
    recall = run.recall
    return Result(
        method=method, budget=budget, n=n, accuracy=float(scores.mean()),
        accuracy_by_type=accuracy_by_type(scores, [e.qtype for e in examples]), agreement_with_full=agreement,
        answer_patch_recall=float(np.nanmean(recall)) if np.isfinite(recall).any() else None,
        kv_bytes=sum(b.kv_bytes for b in run.batches) / n, kv_bytes_full=sum(b.kv_bytes_full for b in run.batches) / n,
        answers=run.answers, kl_first_token=kl, kept_text=float(kept[0]), kept_vision=float(kept[1]), metric=metric,
        scores=scores.tolist() if record else None, texts=run.texts if record else None, **extra)


# ----------------------------------------------------------------------------- does the model read the image?

def image_ablations(model, examples, modes: Sequence[str], **kwargs) -> dict[str, Result]:
    """{mode: full-cache Result} with the images replaced (`synthetic.ablated_images`: "blank",
    "shuffled"); kwargs go to `evaluate`."""
    from vkv_jax.methods import Compression
    from vkv_jax.testbed import synthetic

    size = shapes_image_size(model.config)
    out = {}
    for mode in modes:
        swapped = eval_data.with_images(examples, synthetic.ablated_images([e.image for e in examples], mode, size))
        out[mode] = evaluate(model, swapped, [Compression("full")], desc=f"images: {mode}", **kwargs)[0]
    return out


def question_only(examples, config, train_questions: int, seed: int = 0) -> dict[str, Any]:
    """Accuracy on `examples` (shapes, of `synthetic.ShapesConfig` `config`) of answering from the question
    alone: the answer prior of `testbed.baselines.question_only_baseline` counted over `train_questions`
    seeded training questions."""
    from vkv_jax.testbed import baselines, synthetic

    pool = synthetic.make_examples("train", train_questions, config=config, seed=seed, with_image=False)
    summary = baselines.question_only_baseline(baselines.question_columns(pool), baselines.question_columns(examples))
    accuracy = summary.pop("all")
    return {"train_questions": train_questions, "accuracy": accuracy, "accuracy_by_type": summary}


def layer_attention(params, cfg, input_ids, valid, pixel_values) -> jax.Array:
    """[L, B, S] float32: each LM layer's attention from the last prompt slot over every slot, mean over
    query heads, with the full prompt in the cache. input_ids, valid [B, S] left padded; pixel_values as
    `inputs.device_images` makes them from any model's `Inputs`.

    The LM layers run as in the prefill (`llama.prefill_layers`, the model family's embeddings and RoPE
    positions); each layer's post-RoPE q, k go through FastV's ranking attention
    (`fastv.last_token_attention`).
    """
    from vkv_jax.methods.fastv import last_token_attention
    from vkv_jax.models import family, llama

    x, _, rope = family.prompt_embeddings(params, cfg, input_ids, valid, pixel_values)
    *_, attention = llama.prefill_layers(params["lm"], cfg.text, x, rope, valid,
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
    from vkv_jax.inputs import device_images

    cfg = model.config
    parts = []  # per batch: (mass, uniform, visual), each [L, B]
    for start in range(0, len(asked), batch_size):
        chunk = asked[start:start + batch_size]
        inputs = model.prepare([e.image for e in chunk], [e.question for e in chunk])
        patches = answer_patches(chunk, inputs.layouts)
        attention = np.asarray(_layer_attention_jit(model.params, cfg, jnp.asarray(inputs.input_ids),
                                                    jnp.asarray(inputs.valid),
                                                    device_images(inputs.pixel_values, model.dtype)))
        per_layer = [cell_attention(a, inputs.input_ids, cfg.image_token_id, patches) for a in attention]
        parts.append(tuple(np.stack(x) for x in zip(*per_layer)))
    mass, uniform, visual = (np.concatenate(p, axis=1) for p in zip(*parts))
    by_layer = (mass / uniform).mean(axis=1)
    return {"questions": len(asked), "cell_mass": float(mass[-1].mean()), "uniform_mass": float(uniform[-1].mean()),
            "times_uniform": float(by_layer[-1]), "visual_mass": float(visual[-1].mean()),
            "times_uniform_by_layer": [round(float(x), 3) for x in by_layer]}


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from vkv_jax.cli.common import ArgumentParser, HelpFormatter, at_least, description, model_help

    p = ArgumentParser(prog="python -m vkv_jax.evaluate", description=description(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help=model_help())
    p.add_argument("--data", default="shapes",
                   help='"shapes" (seeded synthetic questions of --split) or a JSONL file of {"image", "question", '
                        '"answer" | "answers"[, "choices", "metric", "qtype"]} rows, image paths relative to the '
                        'file (format: docs/evaluation/README.md, "Your own benchmark")')
    p.add_argument("--metric", default=None, choices=metrics.METRICS,
                   help="how JSONL answers are scored where a row names no metric: exact (normalised exact match "
                        "with any reference), vqa (VQAv2 soft accuracy over the references), anls (DocVQA), "
                        "choice (the option letter; rows with choices take it anyway) (default: exact; the "
                        "shapes testbed is always exact)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="testbed split the shapes questions come from")
    p.add_argument("--limit", "--n", dest="limit", type=at_least(1), default=None,
                   help=f"questions (default: {DEFAULT_SHAPES_LIMIT} shapes questions, every JSONL row); "
                        "--n is a deprecated alias")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list of compression methods (vkv_jax.methods.available()); full runs once, "
                        "first, as the reference")
    p.add_argument("--kv-grid", default=",".join(f"{100 * t:g}" for t in kv_grid.DEFAULT_GRID),
                   help="comma list of live KV shares in percent: each method is run at the budget whose "
                        "measured share is within 0.5 points of each (or the point is marked unreachable)")
    p.add_argument("--budgets", default=None,
                   help="instead of --kv-grid: a comma list of budgets, each a ratio in (0, 1] (of what the "
                        "method's budget is a fraction of: see python -m vkv_jax.generate --help) or an integer "
                        "token count > 1; a budget a method rejects is reported as not run (default: none, "
                        "the --kv-grid runs)")
    p.add_argument("--protocols", default=None,
                   help="comma list of: pre-template (compress before the template's 'ASSISTANT:'), template "
                        "(its rows score too; its KV re-fed from the compressed cache), multi-turn (compress "
                        "turn 1 once, ask later turns' questions; shapes data only) (default: all three for "
                        "shapes, pre-template,template for a JSONL file)")
    p.add_argument("--turns", type=at_least(2), default=DEFAULT_TURNS,
                   help="dialogue length of the multi-turn protocol (turns 2.. are scored)")
    p.add_argument("--references", action=argparse.BooleanOptionalAction, default=True,
                   help="equal-KV reference rows: text only, recency only, text + random visual tokens")
    p.add_argument("--kv-dtype", default=None, choices=kv_quant.QUANTIZED,
                   help="store every run's KV cache quantized, one float32 scale per slot and KV head (the KV "
                        "shares count the scales, so equal KV means equal bytes; default: the model's dtype)")
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

    check_model_dir(args.model)
    check_out_dir(args.out)
    if args.data != "shapes":
        check_input_file(args.data, "--data", "'shapes' or a JSONL file")
    elif args.metric not in (None, "exact"):
        raise ValueError(f"--metric {args.metric} needs --data FILE.jsonl: the shapes testbed's one-word answers "
                         "are scored by exact match")
    methods = parse_names(args.methods, "--methods", available())
    args.method_list = methods
    if args.protocols is None:
        args.protocols = ",".join(p for p in protocols.PROTOCOLS if args.data == "shapes" or p != "multi-turn")
    names = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not names:
        raise ValueError("--protocols is empty; expected a comma list of " + ", ".join(protocols.PROTOCOLS))
    for name in names:
        try:
            protocols.check_protocol(name)
        except ValueError as e:
            raise ValueError(f"--protocols: {e}") from None
    if "multi-turn" in names and args.data != "shapes":
        raise ValueError("--protocols multi-turn needs --data shapes (later turns ask the testbed's further "
                         "questions about each image)")
    args.protocol_list = names
    if args.budgets is None:
        args.targets = parse_kv_grid(args.kv_grid)
        return [], {}, _ablation_modes(args)
    budgets = parse_budgets(args.budgets)
    if not budgets and any(m != "full" for m in methods):
        raise ValueError("--budgets is empty; expected a comma list of budgets, e.g. 0.05,0.1")
    modes = _ablation_modes(args)
    rejected: dict[str, str] = {}
    compressions = compression_grid(methods, budgets, rejected=rejected)
    if not compressions:
        reasons = "; ".join(f"{cell}: {why}" for cell, why in rejected.items())
        raise ValueError(f"no method x budget cell can run ({reasons}); give budgets the methods accept "
                         "(or add full to --methods)")
    return compressions, rejected, modes


def parse_kv_grid(text: str) -> list[float]:
    """--kv-grid "5,10" -> [0.05, 0.1]; raises ValueError naming the flag on a bad entry."""
    out = []
    for x in (x.strip() for x in text.split(",")):
        if not x:
            continue
        try:
            v = float(x)
        except ValueError:
            raise ValueError(f"--kv-grid: {x!r} is not a number (shares in percent, e.g. 5,10,20)") from None
        if not 0 < v <= 100:
            raise ValueError(f"--kv-grid: {x!r} is out of range: a share in percent in (0, 100]")
        out.append(v / 100)
    if not out:
        raise ValueError("--kv-grid is empty; expected shares in percent, e.g. 5,10,20")
    return sorted(set(out))


def _ablation_modes(args) -> list[str]:
    from vkv_jax.testbed.synthetic import ABLATIONS

    modes = [m.strip() for m in args.ablations.split(",") if m.strip()]
    bad = [m for m in modes if m not in ABLATIONS]
    if bad:
        raise ValueError(f"unknown --ablations {', '.join(map(repr, bad))}; allowed: {', '.join(ABLATIONS)}")
    return modes


def _main(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import vkv_jax
    from vkv_jax.evaluation import report as eval_report

    compressions, rejected, modes = _check_args(args)
    shapes = args.data == "shapes"
    # a bad file fails here, every line checked, before the model loads
    examples = None if shapes else eval_data.load_jsonl(args.data, args.limit, args.metric)
    model = vkv_jax.load(args.model)
    shapes_cfg = shapes_config(model)
    if shapes:
        examples = eval_data.shapes(args.split, args.limit or DEFAULT_SHAPES_LIMIT, shapes_cfg)
    run = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, suffix=args.suffix,
               kv_dtype=args.kv_dtype)
    turn_items = (protocols.multi_turn_items(examples, args.turns, shapes_cfg)
                  if "multi-turn" in args.protocol_list else [])
    results = []
    for protocol in args.protocol_list:
        items = turn_items if protocol == "multi-turn" else examples
        if args.budgets is None:
            runner = Runner(model, items, protocol=protocol, cell_grid=shapes_cfg.grid if shapes else None, **run)
            results += evaluate_grid(runner, args.method_list, args.targets,
                                     references=args.references)
        else:
            results += evaluate(model, items, compressions, protocol=protocol, desc=protocol, **run)
    checks = {"ablations": image_ablations(model, examples, modes, **run),
              "question_only_baseline": (question_only(examples, shapes_cfg, args.prior_questions)
                                         if shapes and args.prior_questions else None),
              "attention": attention_concentration(model, examples, args.batch_size)}
    config = dict(eval_report.run_config(args, model), not_run=rejected)
    report = eval_report.Report(config, examples, results, turn_examples=turn_items, **checks)
    print(eval_report.markdown(report))
    written = eval_report.write(args.out, report)
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0
