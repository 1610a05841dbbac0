"""Testbed v3 ("fine-grained"): visual QA where the answer lies in one or two 8-px patches.

192-px images (576 visual tokens with 8-px patches, as testbed v2) on a 24 x 24 grid of 8-px cells,
so every cell is exactly one patch. An image holds

* items: tens of one-patch objects, each a shape (circle, square, triangle, cross) or a printed digit
  (0-9) in one of six colours, bunched in a few clusters so that most items have neighbours;
* labels: 7-8 short strings of capital letters, one letter per patch, dark ink on a light tag, each
  label alone on its row.

Glyphs (digits and letters) are the bitmap font built into Pillow (`ImageFont.load_default_imagefont`),
shapes are fixed bitmaps of the same size; each is placed with a random offset inside its cell, in a
jittered colour, on the testbed's noisy grey background with mid-grey specks and strokes. So an image can
be decoded back to its content exactly (the tests do).

Question types (`QTYPES`), with the patches that hold the evidence:

    item_at       "what is at row 17 column 4?"                  -> red 7 | blue circle | none     1 patch
    find_item     "which cell holds the red 7?"                  -> row 17 column 4                1 patch
    label_letter  "what is letter 2 of the label in row 5?"      -> q                              1 patch
    read_label    "what does the label in row 5 say?"            -> k q z                          3 patches
    count_in_row  "how many objects are in row 17?"              -> 1 .. 24                        the row's items
    relative_near "is the red 7 left or right of the blue circle?" -> left | right  (or above / below;
                  the two items are 1-3 cells apart on the asked axis)                            2 patches
    read_all      "read every label from top to bottom."         -> k q z , a b c , ...  (>= 27 tokens)
                                                                                                   every label patch

Answers are space-separated words of the closed vocabulary (`vocab.vocab_words(TESTBED_V3)`); labels
are read one letter per word, lower case, labels separated by " , ".

Like testbed v1/v2 (`synthetic`), example i of a split is a pure function of (seed, split, index,
config): the same `SeedSequence` over (seed, split id, index) drives every draw, splits differ in the
split id, and `more_questions` seeds question j by the example's seed + (j,). Rows and columns are
1-based in the text, 0-based in the metadata; `answer_cells` lists the (row, col) cells holding the
evidence (`synthetic.cells_to_patches(cells, config, 8)` gives their visual-token indices).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from vkv_jax.testbed.scene import BACKGROUND, COLOUR_NAMES, COLOURS, FINE_QTYPES, NONE, SHAPES, Obj, example_seed

DIGITS = tuple("0123456789")
KINDS = SHAPES + DIGITS  # what an item is
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")  # label letters (drawn as capitals, read in lower case)
QTYPES = FINE_QTYPES  # ("item_at", ..., "read_all"), named in `synthetic` so pools index every testbed's types
LABEL_SEP = ","
TEMPLATES = {
    "item_at": "what is at row {row} column {col}?",
    "find_item": "which cell holds the {colour} {kind}?",
    "label_letter": "what is letter {pos} of the label in row {row}?",
    "read_label": "what does the label in row {row} say?",
    "count_in_row": "how many objects are in row {row}?",
    "relative_lr": "is the {colour} {kind} left or right of the {colour2} {kind2}?",
    "relative_ab": "is the {colour} {kind} above or below the {colour2} {kind2}?",
    "read_all": "read every label from top to bottom.",
}
ANSWER_WORDS = (NONE, "row", "column", "left", "right", "above", "below", LABEL_SEP)

# Shapes as bitmaps the size of a glyph ('#' = ink): at 8 px a drawn disc and a drawn square differ by
# a pixel or two, fixed masks keep the four shapes apart (and decodable) at any offset.
SHAPE_BITMAPS = {
    "circle": ("..###..", ".#####.", "#######", "#######", "#######", ".#####.", "..###.."),
    "square": ("######", "######", "######", "######", "######", "######"),
    "triangle": ("...#...", "..###..", "..###..", ".#####.", ".#####.", "#######"),
    "cross": ("..##..", "..##..", "######", "######", "..##..", "..##.."),
}
TAG_GREY = (165, 205)  # a label tag's grey level range; ink is dark
INK_GREY = (10, 45)


@dataclasses.dataclass(frozen=True)
class FineConfig:
    """Static description of testbed v3 (hashable). `cell` must be at least 8 px (a glyph is 7 x 6)."""

    image_size: int = 192
    grid: int = 24
    min_items: int = 40
    max_items: int = 64
    min_clusters: int = 2
    max_clusters: int = 4
    cluster_spread: float = 1.5  # std of an item's distance from its cluster's centre, in cells
    scattered: float = 0.25  # share of the items placed uniformly instead of in a cluster
    min_labels: int = 7
    max_labels: int = 8
    label_len: int = 3
    max_relative_gap: int = 3  # the two items of a `relative_near` question are 1..this many cells apart
    qtypes: tuple[str, ...] = QTYPES
    qtype_weights: tuple[float, ...] | None = None  # None: uniform over `qtypes`
    noise_std: float = 6.0
    colour_jitter: int = 12
    max_distractors: int = 12

    def __post_init__(self):
        if self.image_size % self.grid:
            raise ValueError(f"image_size={self.image_size} must be a multiple of grid={self.grid}")
        if self.image_size // self.grid < 8:
            raise ValueError(f"cells of {self.image_size // self.grid} px are too small for a glyph (need >= 8)")
        if not 1 <= self.min_labels <= self.max_labels <= self.grid:
            raise ValueError(f"need 1 <= min_labels <= max_labels <= grid={self.grid}, "
                             f"got {self.min_labels}, {self.max_labels}")
        if not 1 <= self.label_len <= self.grid - 2:
            raise ValueError(f"label_len={self.label_len} must be in 1..{self.grid - 2}")
        free = self.grid * self.grid - self.max_labels * (self.label_len + 2)
        if not 2 <= self.min_items <= self.max_items <= free // 2:
            raise ValueError(f"need 2 <= min_items <= max_items <= {free // 2}, got {self.min_items}, "
                             f"{self.max_items}")
        if not 1 <= self.min_clusters <= self.max_clusters:
            raise ValueError(f"need 1 <= min_clusters <= max_clusters, got {self.min_clusters}, {self.max_clusters}")
        bad = [q for q in self.qtypes if q not in QTYPES]
        if bad or not self.qtypes:
            raise ValueError(f"unknown question types {bad}; allowed: {QTYPES}")
        if self.qtype_weights is not None and len(self.qtype_weights) != len(self.qtypes):
            raise ValueError("qtype_weights must have one weight per entry of qtypes")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid


TESTBED_V3 = FineConfig()


@dataclasses.dataclass(frozen=True)
class Label:
    row: int  # 0-based
    col: int  # 0-based column of the first letter
    text: str  # lower-case letters, one per cell

    def cells(self) -> tuple[tuple[int, int], ...]:
        return tuple((self.row, self.col + k) for k in range(len(self.text)))


@dataclasses.dataclass(frozen=True, eq=False)
class FineExample:
    image: np.ndarray | None  # [H, W, 3] uint8 (None: made with with_image=False)
    question: str
    answer: str
    qtype: str
    objects: tuple[Obj, ...]  # the items; `Obj.shape` holds the kind (a shape name or a digit)
    labels: tuple[Label, ...]  # top to bottom
    answer_cells: tuple[tuple[int, int], ...]  # (row, col), 0-based
    params: dict
    seed: tuple[int, int, int]

    def meta(self) -> dict:
        """JSON-able metadata (everything but the image)."""
        return {"question": self.question, "answer": self.answer, "qtype": self.qtype,
                "objects": [dataclasses.asdict(o) for o in self.objects],
                "labels": [dataclasses.asdict(lab) for lab in self.labels],
                "answer_cells": [list(c) for c in self.answer_cells],
                "params": dict(self.params), "seed": list(self.seed)}


# ----------------------------------------------------------------------------- glyphs

@functools.cache
def glyph(char: str) -> np.ndarray:
    """[h, w] bool ink mask of a digit or capital letter in Pillow's built-in bitmap font, cropped to
    its ink (7 x 5-6 for digits, 6 x 4-6 for letters), or of a shape's bitmap (`SHAPE_BITMAPS`)."""
    if char in SHAPE_BITMAPS:
        return np.array([[c == "#" for c in row] for row in SHAPE_BITMAPS[char]])
    from PIL import ImageFont

    if len(char) != 1 or not char.isalnum():
        raise ValueError(f"no glyph for {char!r}")
    m = ImageFont.load_default_imagefont().getmask(char.upper())
    a = np.array(m, np.uint8).reshape(m.size[1], m.size[0]) > 127
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


# ----------------------------------------------------------------------------- layout

def _layout(rng: np.random.Generator, config: FineConfig) -> tuple[tuple[Obj, ...], tuple[Label, ...]]:
    g, n = config.grid, config.label_len
    n_labels = int(rng.integers(config.min_labels, config.max_labels + 1))
    rows = np.sort(rng.choice(g, size=n_labels, replace=False))
    labels = tuple(Label(int(r), int(rng.integers(0, g - n + 1)),
                         "".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), size=n))) for r in rows)
    blocked = np.zeros((g, g), bool)  # label cells and one cell either side: labels stay apart from items
    for lab in labels:
        blocked[lab.row, max(0, lab.col - 1):lab.col + n + 1] = True
    n_items = int(rng.integers(config.min_items, config.max_items + 1))
    centres = rng.uniform(0, g - 1, size=(int(rng.integers(config.min_clusters, config.max_clusters + 1)), 2))
    cells = []
    while len(cells) < n_items:
        if rng.random() < config.scattered:
            r, c = rng.integers(0, g, size=2)
        else:
            r, c = np.rint(centres[rng.integers(len(centres))] + rng.normal(0, config.cluster_spread, size=2))
        r, c = int(r), int(c)
        if 0 <= r < g and 0 <= c < g and not blocked[r, c]:
            blocked[r, c] = True
            cells.append((r, c))
    kinds = rng.integers(0, len(KINDS), size=n_items)
    colours = rng.integers(0, len(COLOUR_NAMES), size=n_items)
    objects = tuple(sorted((Obj(KINDS[k], COLOUR_NAMES[c], r, col) for (r, col), k, c in zip(cells, kinds, colours)),
                           key=lambda o: (o.row, o.col)))
    return objects, labels


# ----------------------------------------------------------------------------- rendering

def _place(tile: np.ndarray, mask: np.ndarray, rgb, rng: np.random.Generator, paint: bool) -> None:
    """Paint `mask` in `rgb` at a random offset inside `tile` [c, c, 3] (draws the offset either way)."""
    h, w = mask.shape
    dy, dx = int(rng.integers(0, tile.shape[0] - h + 1)), int(rng.integers(0, tile.shape[1] - w + 1))
    if paint:
        tile[dy:dy + h, dx:dx + w][mask] = rgb


def render(objects: Sequence[Obj], labels: Sequence[Label], rng: np.random.Generator, config: FineConfig,
           paint: bool = True) -> np.ndarray | None:
    """[H, W, 3] uint8: noisy grey background, grey specks and strokes, then the items (coloured glyph
    or shape masks) and the labels (dark capitals on light tags). paint=False makes the same random
    draws without drawing and returns None (questions without the cost of images)."""
    n, c = config.image_size, config.cell
    img = rng.normal(BACKGROUND, config.noise_std, size=(n, n, 1)).repeat(3, axis=2)
    for _ in range(int(rng.integers(0, config.max_distractors + 1))):
        grey = rng.uniform(85, 130)
        y, x = rng.integers(0, n, size=2)
        if rng.random() < 0.5:
            s = int(rng.integers(1, 3))
            img[y:y + s, x:x + s] = grey
        else:
            length = int(rng.integers(c // 2, 2 * c))
            if rng.random() < 0.5:
                img[y, x:x + length] = grey
            else:
                img[y:y + length, x] = grey
    for o in objects:
        rgb = np.asarray(COLOURS[o.colour], np.float32) + rng.integers(-config.colour_jitter,
                                                                       config.colour_jitter + 1, size=3)
        _place(img[o.row * c:(o.row + 1) * c, o.col * c:(o.col + 1) * c], glyph(o.shape), rgb, rng, paint)
    for lab in labels:
        tag, ink = rng.uniform(*TAG_GREY), rng.uniform(*INK_GREY)
        for k, letter in enumerate(lab.text):
            tile = img[lab.row * c:(lab.row + 1) * c, (lab.col + k) * c:(lab.col + k + 1) * c]
            if paint:
                tile[...] = tag + rng.normal(0, config.noise_std, size=(c, c, 1))
            else:
                rng.normal(0, config.noise_std, size=(c, c, 1))
            _place(tile, glyph(letter), ink, rng, paint)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8) if paint else None


# ----------------------------------------------------------------------------- questions

def _item_name(o: Obj) -> str:
    return f"{o.colour} {o.shape}"


def _unique(objects: Sequence[Obj]) -> list[Obj]:
    kinds = [(o.colour, o.shape) for o in objects]
    return [o for o in objects if kinds.count((o.colour, o.shape)) == 1]


def answer_question(qtype: str, params: dict, objects: Sequence[Obj], labels: Sequence[Label]) -> tuple[str, tuple]:
    """(answer, answer_cells) of a question given by its type and template slots."""
    if qtype == "item_at":
        cell = (params["row"], params["col"])
        hit = [o for o in objects if (o.row, o.col) == cell]
        return (_item_name(hit[0]) if hit else NONE), (cell,)
    if qtype == "find_item":
        (o,) = [o for o in objects if (o.colour, o.shape) == (params["colour"], params["kind"])]
        return f"row {o.row + 1} column {o.col + 1}", ((o.row, o.col),)
    if qtype in ("label_letter", "read_label"):
        (lab,) = [lab for lab in labels if lab.row == params["row"]]
        if qtype == "read_label":
            return " ".join(lab.text), lab.cells()
        return lab.text[params["pos"]], (lab.cells()[params["pos"]],)
    if qtype == "count_in_row":
        hit = [o for o in objects if o.row == params["row"]]
        return str(len(hit)), tuple((o.row, o.col) for o in hit)
    if qtype == "relative_near":
        (a,) = [o for o in objects if (o.colour, o.shape) == (params["colour"], params["kind"])]
        (b,) = [o for o in objects if (o.colour, o.shape) == (params["colour2"], params["kind2"])]
        cells = ((a.row, a.col), (b.row, b.col))
        if params["axis"] == "lr":
            return ("left" if a.col < b.col else "right"), cells
        return ("above" if a.row < b.row else "below"), cells
    if qtype == "read_all":
        cells = tuple(c for lab in labels for c in lab.cells())
        return f" {LABEL_SEP} ".join(" ".join(lab.text) for lab in labels), cells
    raise ValueError(f"unknown question type {qtype!r}; allowed: {QTYPES}")


def question_text(qtype: str, params: dict) -> str:
    """The question of a type and its template slots (0-based slots, 1-based in the text)."""
    p = dict(params)
    for k in ("row", "col", "pos"):
        if k in p:
            p[k] += 1
    if qtype == "relative_near":
        return TEMPLATES["relative_" + p["axis"]].format(**p)
    return TEMPLATES[qtype].format(**p)


def _propose(qtype: str, objects: Sequence[Obj], labels: Sequence[Label], rng: np.random.Generator,
             config: FineConfig):
    """Template slots for `qtype` on this image, or None when the type does not apply."""
    g = config.grid
    if qtype == "item_at":
        # 3 in 4 ask an item's cell ("none" would otherwise be most answers), else any non-label cell
        if rng.random() < 0.75:
            o = objects[rng.integers(len(objects))]
            return {"row": o.row, "col": o.col}
        label_cells = {c for lab in labels for c in lab.cells()}
        free = [(r, c) for r in range(g) for c in range(g) if (r, c) not in label_cells]
        r, c = free[rng.integers(len(free))]
        return {"row": r, "col": c}
    if qtype == "find_item":
        unique = _unique(objects)
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return {"colour": o.colour, "kind": o.shape}
    if qtype in ("label_letter", "read_label"):
        lab = labels[rng.integers(len(labels))]
        if qtype == "read_label":
            return {"row": lab.row}
        return {"row": lab.row, "pos": int(rng.integers(len(lab.text)))}
    if qtype == "count_in_row":
        rows = sorted({o.row for o in objects})  # a row with items: "0" would otherwise be a frequent answer
        return {"row": rows[rng.integers(len(rows))]}
    if qtype == "relative_near":
        unique = _unique(objects)
        axis = "lr" if rng.random() < 0.5 else "ab"
        key = (lambda o: o.col) if axis == "lr" else (lambda o: o.row)
        pairs = [(a, b) for a in unique for b in unique if 1 <= abs(key(a) - key(b)) <= config.max_relative_gap]
        if not pairs:
            return None
        a, b = pairs[rng.integers(len(pairs))]
        return {"colour": a.colour, "kind": a.shape, "colour2": b.colour, "kind2": b.shape, "axis": axis}
    if qtype == "read_all":
        return {}
    raise ValueError(f"unknown question type {qtype!r}; allowed: {QTYPES}")


# ----------------------------------------------------------------------------- examples

def make_example(index: int, split: str = "train", config: FineConfig = TESTBED_V3, seed: int = 0,
                 with_image: bool = True) -> FineExample:
    """Example `index` of `split`: a deterministic function of (seed, split, index, config).
    with_image=False: the same example with `image` None (the same draws, no painting)."""
    key = example_seed(split, index, seed)
    rng = np.random.default_rng(np.random.SeedSequence(key))
    objects, labels = _layout(rng, config)
    image = render(objects, labels, rng, config, paint=with_image)
    return _ask(image, objects, labels, rng, config, key)


def _ask(image, objects, labels, rng, config: FineConfig, key) -> FineExample:
    w = np.ones(len(config.qtypes)) if config.qtype_weights is None else np.asarray(config.qtype_weights, float)
    w = w / w.sum()
    for _ in range(100):  # a type that does not apply to this image is redrawn
        qtype = config.qtypes[rng.choice(len(config.qtypes), p=w)]
        params = _propose(qtype, objects, labels, rng, config)
        if params is not None:
            break
    else:
        raise ValueError(f"question types {config.qtypes} cannot be asked about this image ({key})")
    answer, cells = answer_question(qtype, params, objects, labels)
    return FineExample(image=image, question=question_text(qtype, params), answer=answer, qtype=qtype,
                       objects=objects, labels=labels, answer_cells=cells, params=params, seed=key)


def more_questions(example: FineExample, n: int, config: FineConfig = TESTBED_V3) -> list[FineExample]:
    """`n` further questions about `example`'s image; question j is seeded by `example.seed + (j,)`."""
    return [_ask(example.image, example.objects, example.labels,
                 np.random.default_rng(np.random.SeedSequence(example.seed + (j,))), config, example.seed)
            for j in range(1, n + 1)]


def make_examples(split: str, n: int, start: int = 0, config: FineConfig = TESTBED_V3, seed: int = 0,
                  with_image: bool = True) -> list[FineExample]:
    """Examples `start .. start+n-1` of `split`."""
    return [make_example(i, split, config, seed, with_image) for i in range(start, start + n)]


def answer_vocab(config: FineConfig = TESTBED_V3) -> tuple[str, ...]:
    """Every word an answer can hold."""
    numbers = tuple(str(i) for i in range(config.grid + 1))
    return COLOUR_NAMES + KINDS + LETTERS + ANSWER_WORDS + numbers


def max_answer_words(config: FineConfig = TESTBED_V3) -> int:
    """The most words an answer can have (a `read_all` answer over `max_labels` labels)."""
    return config.max_labels * (config.label_len + 1) - 1

