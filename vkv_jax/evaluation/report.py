"""What `python -m vkv_jax.evaluate` writes to --out:

    results.json            every number, the per-question answers, and the run's configuration
    results.md              per protocol the equal-KV table (or, with --budgets, the method × budget table),
                            then the image checks (ablations, baseline, attention)
    accuracy_vs_kv.png      accuracy (95% Wilson intervals) against the measured live KV share, one panel
                            per protocol, one line per method
    accuracy_vs_budget.png  with --budgets only: accuracy against budget, one line per method; full cache
                            and the question-only baseline as horizontal lines
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from vkv_jax.evaluation import data as eval_data
from vkv_jax.evaluation import metrics
from vkv_jax.evaluation.metrics import normalize_answer
from vkv_jax.evaluation.results import SENSITIVE_SHARE, Result, grid_table, paired_table, table

ABLATION_TEXT = {"blank": "every image blank (background grey)",
                 "shuffled": "each question asked about the next question's image"}


@dataclasses.dataclass
class Report:
    config: dict[str, Any]
    examples: Sequence[Any]
    results: list[Result]
    ablations: dict[str, Result]
    question_only_baseline: dict[str, Any] | None = None
    attention: dict[str, Any] | None = None
    turn_examples: Sequence[Any] = ()  # the multi-turn protocol's questions (`protocols.TurnItem`)


def weights_digest(model_dir: str | os.PathLike) -> str:
    """First 16 hex digits of the sha256 of the checkpoint's *.safetensors files (sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_config(args, model) -> dict[str, Any]:
    """The run's settings as results.json records them. "model" is "default" for the shipped model
    (so the file names no local path), else the directory as given."""
    from vkv_jax import default_model
    from vkv_jax.cli.common import parse_budget

    shipped = default_model.is_shipped() and os.path.samefile(model.path, default_model.SHIPPED)
    return {"command": args.command, "model": "default" if shipped else (args.model or model.path),
            "model_sha256": weights_digest(model.path), "data": args.data,
            "split": args.split if args.data == "shapes" else None, "limit": args.limit, "metric": args.metric,
            "methods": [m for m in args.methods.split(",") if m],
            "budgets": None if args.budgets is None else [parse_budget(b) for b in args.budgets.split(",") if b],
            "kv_grid": None if args.budgets is not None else [float(x) / 100 for x in args.kv_grid.split(",") if x],
            "protocols": [p for p in args.protocols.split(",") if p], "turns": args.turns,
            "references": args.references, "suffix": args.suffix,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "kv_dtype": args.kv_dtype,
            "ablations": [m for m in args.ablations.split(",") if m], "prior_questions": args.prior_questions}


def _result_json(r: Result) -> dict[str, Any]:
    return dict(dataclasses.asdict(r), kv_fraction=r.kv_fraction, ci95=list(r.ci95))


def _question_json(e) -> dict[str, Any]:
    out = {"question": e.question, "answer": e.answer, "qtype": e.qtype}
    if isinstance(e, eval_data.Item):  # a JSONL row: how it is scored
        out.update(metric=e.metric, answers=list(e.references))
        if e.choices:
            out.update(choices=list(e.choices))
    if getattr(e, "turn", None) is not None:  # a later turn of a dialogue (`protocols.TurnItem`)
        out.update(turn=e.turn, asked=e.asked, follow_up=e.follow_up)
    return out


def to_json(report: Report) -> dict[str, Any]:
    """results.json: the questions and gold answers of every protocol ("multi-turn" asks its own)."""
    return {"config": report.config,
            "questions": [_question_json(e) for e in report.examples],
            "gold": [normalize_answer(e.answer) for e in report.examples],
            "turn_questions": [_question_json(e) for e in report.turn_examples],
            "turn_gold": [normalize_answer(e.answer) for e in report.turn_examples],
            "results": [_result_json(r) for r in report.results],
            "ablations": {mode: _result_json(r) for mode, r in report.ablations.items()},
            "question_only_baseline": report.question_only_baseline, "attention": report.attention}


def _by_type(accuracy: dict[str, float]) -> str:
    return f" ({', '.join(f'{t} {v:.3f}' for t, v in accuracy.items())})" if accuracy else ""


def check_lines(report: Report) -> list[str]:
    """Markdown bullets: the method × budget pairs left out, full-cache accuracy with real, blank and
    swapped images, the question-only baseline, and the attention on the asked cell."""
    lines = [f"- Not run: {key} ({reason})" for key, reason in report.config.get("not_run", {}).items()]
    if report.config.get("kv_dtype"):
        lines.append(f"- KV cache stored as {report.config['kv_dtype']} with a float32 scale per slot and KV head, in "
                     "every row (the full cache's too); KV shares count the scales against the float prompt cache")
    lines += [f"- Full cache, real images: accuracy {r.accuracy:.3f}{_by_type(r.accuracy_by_type)}"
             for r in report.results[:1] if r.method == "full"]
    for mode, r in report.ablations.items():
        lines.append(f"- Full cache, {ABLATION_TEXT[mode]}: accuracy {r.accuracy:.3f}{_by_type(r.accuracy_by_type)}")
    if (b := report.question_only_baseline) is not None:
        lines.append(f"- Question-only baseline (majority answer of {b['train_questions']} seeded training questions: "
                     f"by exact question if seen >= 5 times, else by colour/shape skeleton, else by type): "
                     f"accuracy {b['accuracy']:.3f}{_by_type(b['accuracy_by_type'])}")
    if (a := report.attention) is not None:
        lines.append(f"- Attention on the asked cell ({a['questions']} 'shape at row r column c' questions; last "
                     f"layer, from the last prompt token, mean over heads, full cache): {a['times_uniform']:.2f}× "
                     f"uniform (mass {a['cell_mass']:.4f}; uniform over the visual tokens {a['uniform_mass']:.4f}); "
                     f"mass on all visual tokens {a['visual_mass']:.3f}; × uniform by layer (first to last): "
                     + ", ".join(f"{x:.2f}" for x in a["times_uniform_by_layer"]))
    return lines


PROTOCOL_TEXT = {
    "pre-template": "compress before the template's final \"ASSISTANT:\", feed it, answer",
    "template": "prefill the whole prompt (template rows score too), compress, drop the template's KV, "
                "re-feed it from the compressed cache, answer",
    "multi-turn": "compress turn 1's whole prompt once; turns 2.. (gold history fed from the compressed "
                  "cache) ask other questions about the same image; KV share at compression",
}


def protocol_section(report: Report, protocol: str) -> str:
    """One protocol's tables: the equal-KV pivot and the per-run list (grid runs), or the budget table."""
    rs = [r for r in report.results if r.protocol == protocol]
    n = rs[0].n if rs else 0
    head = f"## Protocol `{protocol}` ({n} questions)\n\n{PROTOCOL_TEXT[protocol]}."
    if any(r.target is not None for r in rs):
        parts = [head, grid_table(rs)]
        if subset := [s for r in rs if (s := r.on_sensitive()) is not None]:
            parts += [f"Compression-sensitive subset ({subset[0].n} questions: the full cache answers them right, "
                      f"text + random visual at {SENSITIVE_SHARE:.0%} KV wrong):", grid_table(subset)]
        return "\n\n".join([*parts, "Every run:", paired_table(rs)])
    return "\n\n".join([head, table(rs)])


def markdown(report: Report) -> str:
    c = report.config
    head = (f"`{c['command']}`\n\nmodel: {c['model']} (weights sha256 {c['model_sha256']}); data: {c['data']}"
            + (f" ({c['split']} split)" if c.get("split") else "")
            + f"; {len(report.examples)} questions"
            + (f" ({len(report.turn_examples)} later-turn questions for multi-turn)" if report.turn_examples else "")
            + f"; suffix {c['suffix']}; greedy, {c['max_new_tokens']} new tokens."
            + metric_text(report.results))
    protocols = list(dict.fromkeys(r.protocol for r in report.results))
    return "\n\n".join([head, *(protocol_section(report, p) for p in protocols), "## Checks (full cache)",
                        "\n".join(check_lines(report))]) + "\n"


def metric_text(results: Sequence[Result]) -> str:
    """The header's note on a metric other than exact match: what "accuracy" means, how its intervals and
    paired tests read it; "" for exact match (the testbed's)."""
    name = results[0].metric if results else "exact"
    if name == "exact":
        return ""
    text = f"\n\nAccuracy is the mean over the questions of {metrics.describe(name)}."
    if not metrics.is_binary(name):
        text += (" Its 95% interval is Wilson's with the summed scores for k (conservative for scores in "
                 "[0, 1]); McNemar tests count a question as right when it scores at least 0.5.")
    return text


def axis_label(results: Sequence[Result]) -> str:
    """The plots' accuracy axis: "exact-match accuracy", a JSONL metric's name, or "mean score" (mixed)."""
    name = results[0].metric if results else "exact"
    return {"exact": "exact-match accuracy"}.get(name, metrics.TEXT.get(name, "mean score"))


def plot_budgets(report: Report):
    """accuracy_vs_budget.png's figure (log budget axis when the budgets span 10× or more)."""
    from vkv_jax import viz

    first = report.results[0].protocol if report.results else None
    results = [r for r in report.results if r.protocol == first]  # one line per method
    budgets = [float(r.budget) for r in results if r.budget is not None]
    wide = bool(budgets) and min(budgets) > 0 and max(budgets) >= 10 * min(budgets)
    b = report.question_only_baseline
    return viz.plot_accuracy_vs_budget(results, size=(6.5, 3.6), xscale="log" if wide else "linear",
                                       ylabel=axis_label(results),
                                       references={"question only": b["accuracy"]} if b else None)


def plot_equal_kv(results: Sequence[Result]):
    """accuracy_vs_kv.png's figure: one panel per protocol, accuracy with its 95% Wilson interval against
    the measured live KV share (log axis), one line per method; full cache and text only as markers."""
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(r.protocol for r in results))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.2 * len(protocols), 4.2), squeeze=False,
                             constrained_layout=True, sharey=True)
    methods = list(dict.fromkeys(r.method for r in results))
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    for ax, protocol in zip(axes[0], protocols):
        for method in methods:
            rs = sorted((r for r in results if r.protocol == protocol and r.method == method),
                        key=lambda r: r.kv_fraction)
            if not rs:
                continue
            x = [r.kv_fraction for r in rs]
            y = [r.accuracy for r in rs]
            err = [[max(0.0, r.accuracy - r.ci95[0]) for r in rs], [max(0.0, r.ci95[1] - r.accuracy) for r in rs]]
            style = dict(marker="o", ms=3, capsize=2, lw=1, color=colours[method], label=method,
                         linestyle="none" if len(rs) == 1 else "-")
            ax.errorbar(x, y, yerr=err, **style)
        ax.set_xscale("log")
        ax.set_title(protocol)
        ax.set_xlabel("measured live KV / full KV")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{axis_label(results)} (95% Wilson)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return fig


def write(out: str | os.PathLike, report: Report) -> list[str]:
    """Write results.json, results.md and the plots into `out` (created); returns their names."""
    import matplotlib.pyplot as plt

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(to_json(report), indent=1) + "\n")
    (out / "results.md").write_text("# Evaluation results\n\n" + markdown(report))
    figures = [("accuracy_vs_kv.png", plot_equal_kv(report.results))]
    if report.config.get("budgets"):
        figures.append(("accuracy_vs_budget.png", plot_budgets(report)))
    for name, fig in figures:
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return ["results.json", "results.md", *(name for name, _ in figures)]
