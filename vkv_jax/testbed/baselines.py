"""How well the testbed's questions can be answered without the image: the question-only baseline."""

from __future__ import annotations

import collections

import numpy as np

from vkv_jax.testbed import synthetic as S


def _skeleton(question: str) -> str:
    """The question with its colour/shape words blanked (keeps row/column digits and the axis)."""
    return " ".join("_" if w.strip("?") in S.COLOURS or w.strip("?") in S.SHAPES else w for w in question.split())


def question_only_baseline(train: dict, val: dict) -> dict[str, float]:
    """Exact match on `val` of the best text-only guess: the majority training answer of the exact
    question string (if seen >= 5 times), else of its colour/shape skeleton, else of its type.

    train, val: columns "questions", "qtype", "answers" of equal length (a `train.build_pool` pool, or
    `question_columns(...)`); a qtype is a name in `S.ALL_QTYPES` or its index.
    """
    hits = collections.defaultdict(list)
    for guess, t, a in zip(question_only_predictions(train, val), val["qtype"], val["answers"]):
        hits[qtype_name(t)].append(guess == a)
    return exact_match_summary(hits)


def question_only_predictions(train: dict, val: dict) -> list[str | None]:
    """The guess of `question_only_baseline` for each row of `val` (None for a type unseen in `train`)."""
    by_q, by_s, by_t = (collections.defaultdict(collections.Counter) for _ in range(3))
    for q, t, a in zip(train["questions"], train["qtype"], train["answers"]):
        by_q[q][a] += 1
        by_s[_skeleton(q)][a] += 1
        by_t[qtype_name(t)][a] += 1
    out = []
    for q, t in zip(val["questions"], val["qtype"]):
        counts = by_q[q] if sum(by_q[q].values()) >= 5 else (by_s[_skeleton(q)] or by_t[qtype_name(t)])
        out.append(counts.most_common(1)[0][0] if counts else None)
    return out


def qtype_name(t) -> str:
    """A question type's name from its name or its index in `S.ALL_QTYPES` (as a training pool stores it)."""
    return t if isinstance(t, str) else S.ALL_QTYPES[int(t)]


def question_columns(examples) -> dict[str, list]:
    """The "questions" / "qtype" / "answers" columns of `question_only_baseline` from Examples (e.g.
    `S.make_examples(..., with_image=False)`, which draws 20000 training questions in seconds)."""
    return {"questions": [e.question for e in examples], "qtype": [e.qtype for e in examples],
            "answers": [e.answer for e in examples]}


def exact_match_summary(hits: dict[str, list]) -> dict[str, float]:
    """{qtype: mean hit rate} in `S.ALL_QTYPES` order (any other type after them, sorted), plus "all" over
    every hit (rounded to 4 places)."""
    order = list(S.ALL_QTYPES) + sorted(k for k in hits if k not in S.ALL_QTYPES)
    out = {k: round(float(np.mean(hits[k])), 4) for k in order if hits.get(k)}
    out["all"] = round(float(np.mean([x for v in hits.values() for x in v])), 4)
    return out
