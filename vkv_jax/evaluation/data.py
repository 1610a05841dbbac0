"""The questions `python -m vkv_jax.evaluate` asks, how each is scored, and the image swaps of its "does the
model read the image?" checks.

Two sources, one interface (what the harness reads of an item: `image`, `question`, `answer`, `qtype`,
`answer_cells`, and `scoring(item)`):

* `shapes(...)`: seeded synthetic test questions (`vkv_jax.testbed.synthetic.Example`), scored by exact match;
* `load_jsonl(path)`: a benchmark of your own, one JSON object a line (blank lines skipped):

      {"image": "img/0001.png", "question": "what is on the table?", "answer": "cup", "qtype": "objects"}
      {"image": "img/0002.png", "question": "what colour is the bus?", "answers": ["red", "red", "dark red", ...]}
      {"image": "img/0003.png", "question": "what is shown?", "choices": ["a cat", "a dog"], "answer": "B"}
      {"image": "scans/7.png", "question": "what is the invoice total?", "answers": ["$1,200.00"], "metric": "anls"}

  - "image": a path relative to the file's directory (any size: the model's processor resizes it);
  - "question": the prompt text;
  - "answer" (one reference, a string) or "answers" (several, a non-empty list of strings), not both;
  - "metric" (optional): how the row is scored, one of `metrics.METRICS` (exact, vqa, anls, choice);
    a row without one is scored "choice" when it has "choices", else by --metric (default "exact");
  - "choices" (optional, 2 to 26 strings): a multiple-choice row. The question is asked with its options
    lettered below it and LLaVA-1.5's instruction (`choice_prompt`):

        what is shown?
        A. a cat
        B. a dog
        Answer with the option's letter from the given choices directly.

    and its reference is a letter ("B", "b") or one option's text (stored as that option's letter). A
    "choice" row without "choices" has its options written in the question by you, and letters for answers;
  - "qtype" (optional): a question type, for the per-type accuracy.

  Every line is checked before any model loads (also the lines past --limit): a malformed line, a missing
  or unreadable image, an unknown metric or a bad reference is an error naming the file and line. Such rows
  hold no answer cells, so their answer-patch recall is undefined (None).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from vkv_jax.evaluation import metrics

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's MMBench prompt
MAX_CHOICES = len(metrics.LETTERS)


@dataclasses.dataclass(frozen=True)
class Item:
    """One question of a JSONL benchmark."""

    image: Any  # a file path (absolute) or an [H, W, 3] uint8 array
    question: str  # the prompt as asked (a multiple-choice row's with its lettered options)
    answer: str  # the first reference
    qtype: str | None = None
    answer_cells: tuple[tuple[int, int], ...] = ()
    answers: tuple[str, ...] = ()  # every reference (empty: just `answer`); option letters for "choice"
    choices: tuple[str, ...] = ()  # a multiple-choice row's options, in letter order
    metric: str = "exact"  # `metrics.METRICS`

    @property
    def references(self) -> tuple[str, ...]:
        return self.answers or (self.answer,)


def scoring(item) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(metric, references, choices) of any question the harness asks: a JSONL `Item`'s own; exact match
    of its one answer for the testbed's questions (`synthetic.Example`, `protocols.TurnItem`)."""
    if isinstance(item, Item):
        return item.metric, item.references, item.choices
    return "exact", (item.answer,), ()


def metric_name(items: Sequence[Any]) -> str:
    """The metric of a run over `items`: the rows' one metric, or their names in `metrics.METRICS` order
    joined by "+" when rows differ."""
    used = {scoring(item)[0] for item in items}
    return "+".join(m for m in metrics.METRICS if m in used)


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """A multiple-choice question as asked: the question, one "A. option" line per choice, the instruction."""
    return "\n".join([question, *(f"{metrics.LETTERS[i]}. {c}" for i, c in enumerate(choices)),
                      CHOICE_INSTRUCTION])


def shapes(split: str, n: int, config, seed: int = 0):
    """Synthetic examples 0..n-1 of `split` under a `synthetic.ShapesConfig` (`harness.shapes_config`
    gives a model's: its own testbed, drawn at its vision tower's size)."""
    from vkv_jax.testbed import synthetic

    return synthetic.make_examples(split, n, config=config, seed=seed)


def load_jsonl(path: str | os.PathLike, limit: int | None = None, metric: str | None = None) -> list[Item]:
    """The first `limit` rows (all when None) of a JSONL benchmark (format: the module docstring); every
    line is checked, also those past `limit`. metric: the metric of rows that name none and have no
    choices (None: "exact").

    Raises FileNotFoundError for a missing file or image, ValueError for a malformed row, an unreadable
    image, an unknown metric or a bad reference; both name the line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file (expected 'shapes' or a .jsonl file)")
    if metric is not None and metric not in metrics.METRICS:
        raise ValueError(f"--metric {metric!r} is unknown; allowed: {', '.join(metrics.METRICS)}")
    root = os.path.dirname(os.path.abspath(path))
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                items.append(_parse_row(line, f"{path}:{number}", root, metric))
    if not items:
        raise ValueError(f"{path}: no rows")
    return items[:limit]


def _parse_row(line: str, where: str, root: str, default_metric: str | None) -> Item:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for key in ("image", "question"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {row.get(key)!r}")
    for key in ("qtype", "metric"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {row[key]!r}")
    choices = _strings(row, "choices", where, 2, MAX_CHOICES) if "choices" in row else ()
    metric = row["metric"] if row.get("metric") is not None else \
        "choice" if choices else default_metric or "exact"
    if metric not in metrics.METRICS:
        raise ValueError(f"{where}: unknown metric {metric!r}; allowed: {', '.join(metrics.METRICS)}")
    if choices and metric != "choice":
        raise ValueError(f"{where}: a row with 'choices' is scored by the metric 'choice', not {metric!r}")
    references = _references(row, where)
    if metric == "choice":
        references = tuple(_letter(r, choices, where) for r in references)
    image = os.path.join(root, row["image"])
    _check_image(image, row["image"], where)
    question = choice_prompt(row["question"], choices) if choices else row["question"]
    return Item(image=image, question=question, answer=references[0], qtype=row.get("qtype"),
                answers=references, choices=choices, metric=metric)


def _strings(row: dict, key: str, where: str, least: int = 1, most: int | None = None) -> tuple[str, ...]:
    """row[key] as a tuple of non-empty strings, `least` to `most` of them; ValueError naming the line."""
    value = row[key]
    size = f"{least} to {most}" if most else f"at least {least}"
    if (not isinstance(value, list) or not least <= len(value) <= (most or len(value))
            or not all(isinstance(v, str) and v.strip() for v in value)):
        raise ValueError(f"{where}: {key!r} must be a list of {size} non-empty strings, got {value!r}")
    return tuple(value)


def _references(row: dict, where: str) -> tuple[str, ...]:
    if "answer" in row and "answers" in row:
        raise ValueError(f"{where}: give 'answer' (one reference) or 'answers' (a list of references), not both")
    if "answers" in row:
        return _strings(row, "answers", where)
    if not isinstance(row.get("answer"), str) or not row["answer"].strip():
        raise ValueError(f"{where}: 'answer' must be a non-empty string (or give 'answers', a list of "
                         f"strings), got {row.get('answer')!r}")
    return (row["answer"],)


def _letter(reference: str, choices: Sequence[str], where: str) -> str:
    """A multiple-choice reference as its option letter: a letter among the options' (any letter without
    choices), or one option's text."""
    letters = metrics.LETTERS[:len(choices)] if choices else metrics.LETTERS
    ref = reference.strip()
    if len(ref) == 1 and ref.upper() in letters:
        return ref.upper()
    named = [letters[i] for i, c in enumerate(choices)
             if metrics.normalize_answer(c) == metrics.normalize_answer(ref)]
    if len(named) == 1:
        return named[0]
    options = f"one of {letters[0]}..{letters[-1]} or an option's text" if choices else \
        "a letter (the options are in the question: no 'choices')"
    raise ValueError(f"{where}: the multiple-choice answer {reference!r} must be {options}")


def _check_image(path: str, given: str, where: str) -> None:
    """The image exists and PIL reads its header (a quick check: the pixels are decoded when prepared)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {given!r} not found (looked for {path})")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: image {given!r} is not an image PIL can read ({e})") from None


def with_images(items: Sequence[Any], images: Sequence[Any]) -> list[Any]:
    """`items` with their images replaced, one for one (answers and metadata unchanged)."""
    return [dataclasses.replace(item, image=image) for item, image in zip(items, images, strict=True)]
