"""What `python -m vkv_jax.evaluate` writes to --out:

    results.json            every number, the per-question answers, and the run's configuration
    results.md              the method × budget table, then the image checks (ablations, baseline, attention)
    accuracy_vs_budget.png  accuracy against budget, one line per method; full cache and the
                            question-only baseline as horizontal lines
    accuracy_vs_kv.png      accuracy and answer-patch recall against the live KV fraction
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from vkv_jax.evaluation.results import Result, normalize_answer, table

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
            "split": args.split if args.data == "shapes" else None, "limit": args.limit,
            "methods": [m for m in args.methods.split(",") if m],
            "budgets": [parse_budget(b) for b in args.budgets.split(",") if b], "suffix": args.suffix,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "ablations": [m for m in args.ablations.split(",") if m], "prior_questions": args.prior_questions}


def _result_json(r: Result) -> dict[str, Any]:
    return dict(dataclasses.asdict(r), kv_fraction=r.kv_fraction)


def to_json(report: Report) -> dict[str, Any]:
    return {"config": report.config,
            "questions": [{"question": e.question, "answer": e.answer, "qtype": e.qtype} for e in report.examples],
            "gold": [normalize_answer(e.answer) for e in report.examples],
            "results": [_result_json(r) for r in report.results],
            "ablations": {mode: _result_json(r) for mode, r in report.ablations.items()},
            "question_only_baseline": report.question_only_baseline, "attention": report.attention}


def _by_type(accuracy: dict[str, float]) -> str:
    return f" ({', '.join(f'{t} {v:.3f}' for t, v in accuracy.items())})" if accuracy else ""


def check_lines(report: Report) -> list[str]:
    """Markdown bullets: the method × budget pairs left out, full-cache accuracy with real, blank and
    swapped images, the question-only baseline, and the attention on the asked cell."""
    lines = [f"- Not run: {key} ({reason})" for key, reason in report.config.get("not_run", {}).items()]
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


def markdown(report: Report) -> str:
    c = report.config
    head = (f"`{c['command']}`\n\nmodel: {c['model']} (weights sha256 {c['model_sha256']}); data: {c['data']}"
            + (f" ({c['split']} split)" if c.get("split") else "")
            + f"; {len(report.examples)} questions; suffix {c['suffix']}; greedy, {c['max_new_tokens']} new tokens.")
    return "\n\n".join([head, table(report.results), "\n".join(check_lines(report))]) + "\n"


def plot_budgets(report: Report):
    """accuracy_vs_budget.png's figure (log budget axis when the budgets span 10× or more)."""
    from vkv_jax import viz

    budgets = [float(r.budget) for r in report.results if r.budget is not None]
    wide = bool(budgets) and min(budgets) > 0 and max(budgets) >= 10 * min(budgets)
    b = report.question_only_baseline
    return viz.plot_accuracy_vs_budget(report.results, size=(6.5, 3.6), xscale="log" if wide else "linear",
                                       references={"question only": b["accuracy"]} if b else None)


def write(out: str | os.PathLike, report: Report) -> list[str]:
    """Write the four files into `out` (created); returns their names."""
    import matplotlib.pyplot as plt

    from vkv_jax import viz

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(to_json(report), indent=1) + "\n")
    (out / "results.md").write_text("# Evaluation results\n\n" + markdown(report))
    for name, fig in (("accuracy_vs_budget.png", plot_budgets(report)),
                      ("accuracy_vs_kv.png", viz.plot_accuracy_vs_kv(report.results))):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return ["results.json", "results.md", "accuracy_vs_budget.png", "accuracy_vs_kv.png"]
