"""What every testbed shares: the palette, the shapes, the question-type names, the splits and the seed of
an example. `synthetic` (testbed v1/v2) and `finegrained` (testbed v3) both build on it, so neither imports
the other for these names."""

from __future__ import annotations

import dataclasses

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # name -> RGB; kept far apart so a ±jitter never makes two colours meet
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 210, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
COLOUR_NAMES = tuple(COLOURS)
# every question type; the indices of the first five are fixed (training pools store them)
QTYPES = ("colour_of_shape", "shape_at", "count", "exists", "relative", "object_at")
ONE_WORD_QTYPES = QTYPES[:5]
# testbed v3's question types (`finegrained`), named here so that a training pool can store the type of any
# testbed's question as its index in ALL_QTYPES (the indices of QTYPES unchanged)
FINE_QTYPES = ("item_at", "find_item", "label_letter", "read_label", "count_in_row", "relative_near", "read_all")
ALL_QTYPES = QTYPES + FINE_QTYPES
SPLITS = {"train": 0, "validation": 1, "test": 2}
BACKGROUND = 40  # grey level of the background; distractors are mid-grey, never a palette colour
NONE = "none"


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    row: int  # 0-based
    col: int  # 0-based


def example_seed(split: str, index: int, seed: int = 0) -> tuple[int, int, int]:
    """The seed tuple of example `index` of `split`; tuples of different splits never coincide."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {tuple(SPLITS)}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    return (int(seed), SPLITS[split], int(index))
