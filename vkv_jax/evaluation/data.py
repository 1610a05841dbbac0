"""The questions `python -m vkv_jax.evaluate` asks, and the image swaps of its "does the model read the
image?" checks.

Two sources, one interface (what the harness reads of an item: `image`, `question`, `answer`, `qtype`,
`answer_cells`):

* `shapes(...)`: seeded synthetic test questions (`vkv_jax.testbed.synthetic.Example`);
* `load_jsonl(path)`: a benchmark of your own, one JSON object a line,
  `{"image": "img/0001.png", "question": "what is on the table?", "answer": "cup", "qtype": "objects"}`
  (image paths relative to the file's directory; "qtype" optional). Such rows hold no answer cells, so
  their answer-patch recall is undefined (None). Images of any size: the model's processor resizes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Item:
    """One question of a JSONL benchmark."""

    image: Any  # a file path (absolute) or an [H, W, 3] uint8 array
    question: str
    answer: str
    qtype: str | None = None
    answer_cells: tuple[tuple[int, int], ...] = ()


def shapes(split: str, n: int, config, seed: int = 0):
    """Synthetic examples 0..n-1 of `split` under a `synthetic.ShapesConfig` (`harness.shapes_config`
    gives a model's: its own testbed, drawn at its vision tower's size)."""
    from vkv_jax.testbed import synthetic

    return synthetic.make_examples(split, n, config=config, seed=seed)


def load_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[Item]:
    """The first `limit` rows (all when None) of a JSONL benchmark; blank lines are skipped.

    Raises FileNotFoundError for a missing file or image, ValueError for a malformed row; both name the
    line number.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file (expected 'shapes' or a .jsonl file)")
    root = os.path.dirname(os.path.abspath(path))
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                items.append(_parse_row(line, f"{path}:{number}", root))
    if not items:
        raise ValueError(f"{path}: no rows")
    return items


def _parse_row(line: str, where: str, root: str) -> Item:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for key in ("image", "question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {row.get(key)!r}")
    qtype = row.get("qtype")
    if qtype is not None and not isinstance(qtype, str):
        raise ValueError(f"{where}: 'qtype' must be a string, got {qtype!r}")
    image = os.path.join(root, row["image"])
    if not os.path.isfile(image):
        raise FileNotFoundError(f"{where}: image {row['image']!r} not found (looked for {image})")
    return Item(image=image, question=row["question"], answer=row["answer"], qtype=qtype)


def with_images(items: Sequence[Any], images: Sequence[Any]) -> list[Any]:
    """`items` with their images replaced, one for one (answers and metadata unchanged)."""
    return [dataclasses.replace(item, image=image) for item, image in zip(items, images, strict=True)]
