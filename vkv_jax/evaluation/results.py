"""One evaluation cell's numbers (`Result`) and the markdown tables of cells (answers are scored by `metrics`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vkv_jax.evaluation.metrics import is_binary
from vkv_jax.evaluation.stats import wilson

# the compression-sensitive subset: questions the full cache answers right and text + random visual
# tokens at this KV share answers wrong (the equal-KV tables report all questions and this subset)
SENSITIVE_SHARE = 0.10


@dataclasses.dataclass
class Result:
    method: str
    budget: float | int | None
    n: int
    accuracy: float  # mean score of `metric` over the questions (exact match: the share answered right)
    accuracy_by_type: dict[str, float]
    agreement_with_full: float | None
    answer_patch_recall: float | None
    kv_bytes: float  # mean live KV bytes per prompt after compression
    kv_bytes_full: float  # mean live KV bytes per prompt without compression
    answers: list[str]
    kl_first_token: float | None = None  # mean KL(p_full || p_method) of the first answer token
    kept_text: float | None = None  # prompt text tokens kept per layer (mean over layers, rows, kv heads)
    kept_vision: float | None = None  # visual tokens kept per layer (likewise)
    protocol: str = "pre-template"  # `protocols.PROTOCOLS`
    target: float | None = None  # the equal-KV grid point this run was solved for (`kv_grid`)
    status: str | None = None  # the solver's outcome for `target` (`kv_grid.GridPoint.status`)
    vs_snapkv: dict | None = None  # exact McNemar test against SnapKV at the same grid point (`stats`)
    note: str | None = None  # e.g. "= recency": SnapKV's window held everything it kept
    metric: str = "exact"  # `metrics.METRICS`; a JSONL file whose rows differ: their names joined by "+"
    scores: list[float] | None = None  # per question, when the metric is not exact (`metrics.score`)
    texts: list[str] | None = None  # the answers as generated (unnormalised), likewise
    # accuracy on the compression-sensitive subset ({"n", "accuracy"}; `harness.SENSITIVE_SHARE`)
    sensitive: dict | None = None

    @property
    def kv_fraction(self) -> float:
        return self.kv_bytes / max(self.kv_bytes_full, 1.0)

    @property
    def ci95(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy over the n questions. A soft metric's (vqa, anls) takes the
        summed scores for k: a score in [0, 1] with mean p varies at most p(1 - p), a right/wrong answer's
        variance, so the interval is conservative (a 0/1 metric's width at the same mean)."""
        k = self.accuracy * self.n
        return wilson(round(k) if is_binary(self.metric) else k, self.n)

    def on_sensitive(self) -> Result | None:
        """This run restricted to the compression-sensitive subset (accuracy and n; None without one)."""
        if not self.sensitive or not self.sensitive["n"]:
            return None
        return dataclasses.replace(self, n=self.sensitive["n"], accuracy=self.sensitive["accuracy"], vs_snapkv=None)


def accuracy_by_type(correct: np.ndarray, qtypes: Sequence[str | None]) -> dict[str, float]:
    """{question type: accuracy} over the rows that have a type, in `ordered_types` order."""
    qtypes = np.array([t if t is not None else "" for t in qtypes], dtype=object)
    return {t: float(correct[qtypes == t].mean()) for t in ordered_types(set(qtypes) - {""})}


def ordered_types(types) -> list[str]:
    """The testbed's question types in `synthetic.QTYPES` order, then any others sorted."""
    from vkv_jax.testbed.synthetic import QTYPES

    return sorted(types, key=lambda t: (QTYPES.index(t) if t in QTYPES else len(QTYPES), t))


def table(results: Sequence[Result]) -> str:
    """A markdown table, one row per run: accuracy (overall and per type), agreement with the full cache,
    first-token KL, answer-patch recall, kept vision / text tokens per layer, live KV share of full."""
    types = ordered_types({t for r in results for t in r.accuracy_by_type})
    head = ["method", "budget", "accuracy", "95% CI", *types, "agree", "KL", "recall", "kept vision", "kept text",
            "KV"]

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.method, fmt(r.budget, "g"), fmt(r.accuracy), interval(r.ci95),
                 *(fmt(r.accuracy_by_type.get(t)) for t in types),
                 fmt(r.agreement_with_full), fmt(r.kl_first_token, ".4f"), fmt(r.answer_patch_recall),
                 fmt(r.kept_vision, ".1f"), fmt(r.kept_text, ".1f"), f"{r.kv_fraction:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval(ci: tuple[float, float]) -> str:
    return f"{ci[0]:.2f}–{ci[1]:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def cell(r: Result) -> str:
    """One grid cell: accuracy [95% CI], with the measured share when the target was not hit."""
    text = f"{r.accuracy:.2f} [{interval(r.ci95)}]"
    if r.status != "hit":
        text += f" @{_pct(r.kv_fraction)}" + (" floor" if r.status == "below floor" else "")
    return text + (" =rec" if r.note == "= recency" else "")


def grid_table(results: Sequence[Result]) -> str:
    """Markdown pivot of one protocol's equal-KV runs: one row per method, one column per target share;
    a cell is accuracy [95% Wilson interval], "@share" when the solver could not hit the target ("floor":
    the method keeps more at its lowest budget), "=rec" when SnapKV's window held all it kept. Full cache
    and text only (one share each) get their share in the first column."""
    targets = sorted({r.target for r in results if r.target is not None})
    head = ["method", "own share", *(f"{_pct(t)} KV" for t in targets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]
        by_target = {r.target: r for r in rs}
        if None in by_target:
            r = by_target[None]
            cells = [f"{r.accuracy:.2f} [{interval(r.ci95)}] @{_pct(r.kv_fraction)}"] + ["" for _ in targets]
        else:
            cells = [""] + [cell(by_target[t]) if t in by_target else "-" for t in targets]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def paired_table(results: Sequence[Result]) -> str:
    """Markdown list of one protocol's grid runs with their measured share, budget, interval, and the
    exact McNemar test against SnapKV at the same target (questions only this method / only SnapKV got
    right, two-sided p)."""
    head = ["method", "target", "status", "KV share", "budget", "accuracy", "95% CI", "vs SnapKV (+/-, p)",
            "agree", "KL", "recall", "kept vision", "kept text", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.target is None:
            continue
        p = r.vs_snapkv
        paired = "-" if p is None else f"+{p['a_only']}/-{p['b_only']}, p={p['p']:.3g}"
        cells = [r.method, _pct(r.target), r.status or "-", _pct(r.kv_fraction), f"{r.budget:.4g}",
                 f"{r.accuracy:.3f}", interval(r.ci95), paired,
                 "-" if r.agreement_with_full is None else f"{r.agreement_with_full:.3f}",
                 "-" if r.kl_first_token is None else f"{r.kl_first_token:.3f}",
                 "-" if r.answer_patch_recall is None else f"{r.answer_patch_recall:.3f}",
                 f"{r.kept_vision:.1f}", f"{r.kept_text:.1f}", r.note or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
