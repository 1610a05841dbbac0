"""Seeded synthetic visual QA ("shapes"): images of coloured shapes on a grid, one- or two-word answers.

Every example is a pure function of `(seed, split, index)`: the three integers seed one
`np.random.Generator` (a `SeedSequence` over the tuple), so the same triple always gives the same
image, question and answer, and the splits are disjoint because their seed tuples differ in the
split id (`SPLITS`). Images are drawn with numpy only.

An image is `grid × grid` cells of `image_size // grid` pixels; each object fills one cell (with
jitter of size and position inside it). With `image_size=64, grid=8` and patch 8 one cell is one
visual token; with `image_size=128` one cell is 2×2 patches (256 visual tokens); `TESTBED_V2`
(`image_size=192`) makes one cell 3×3 patches: 576 visual tokens, LLaVA-1.5's count.

Question types (`QTYPES`), each answerable only by looking at specific cells:

    colour_of_shape   "what color is the circle?"                      -> red | green | ...
    shape_at          "what shape is at row 3 column 5?"               -> circle | ... | none
    count             "how many blue objects are there?"               -> 0 .. 8
    exists            "is there a red square?"                         -> yes | no
    relative          "is the red circle left or right of the blue cross?"  -> left | right
                      "is the red circle above or below the blue cross?"    -> above | below
    object_at         "what is at row 3 column 5?"                     -> red circle | ... | none

`ShapesConfig.qtypes` defaults to the five one-word types (`ONE_WORD_QTYPES`, the shipped 64-token
model's data); `object_at`, whose answers are colour + shape, belongs to `TESTBED_V2`.

Rows and columns are 1-based in the text and 0-based in the metadata. `Example.answer_cells` lists
the cells holding the evidence for the answer (the asked cell for `shape_at`, the matching objects
otherwise; empty when the evidence is an absence, e.g. "exists" → "no" or a count of 0), so a
compression test can check that the kept visual tokens cover them (`cells_to_patches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from vkv_jax.testbed.scene import (  # noqa: F401  (re-exported: the testbed's public names)
    ALL_QTYPES,
    BACKGROUND,
    COLOUR_NAMES,
    COLOURS,
    FINE_QTYPES,
    NONE,
    ONE_WORD_QTYPES,
    QTYPES,
    SHAPES,
    SPLITS,
    Obj,
    example_seed,
)

TEMPLATES = {
    "colour_of_shape": "what color is the {shape}?",
    "shape_at": "what shape is at row {row} column {col}?",
    "count": "how many {colour} objects are there?",
    "exists": "is there a {colour} {shape}?",
    "relative_lr": "is the {colour} {shape} left or right of the {colour2} {shape2}?",
    "relative_ab": "is the {colour} {shape} above or below the {colour2} {shape2}?",
    "object_at": "what is at row {row} column {col}?",
}


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """Static description of a synthetic split (hashable; change it to build a curriculum)."""

    image_size: int = 128
    grid: int = 8
    min_objects: int = 3
    max_objects: int = 8
    qtypes: tuple[str, ...] = ONE_WORD_QTYPES
    qtype_weights: tuple[float, ...] | None = None  # None: uniform over `qtypes`
    noise_std: float = 6.0  # background pixel noise (grey levels)
    colour_jitter: int = 12  # per-object, per-channel colour offset bound
    max_distractors: int = 6  # mid-grey specks / short strokes drawn under the objects

    def __post_init__(self):
        if self.image_size % self.grid:
            raise ValueError(f"image_size={self.image_size} must be a multiple of grid={self.grid}")
        if self.image_size // self.grid < 6:
            raise ValueError(f"cells of {self.image_size // self.grid} px are too small (need >= 6)")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {self.grid ** 2}, "
                             f"got {self.min_objects}, {self.max_objects}")
        bad = [q for q in self.qtypes if q not in QTYPES]
        if bad or not self.qtypes:
            raise ValueError(f"unknown question types {bad}; allowed: {QTYPES}")
        if self.qtype_weights is not None and len(self.qtype_weights) != len(self.qtypes):
            raise ValueError("qtype_weights must have one weight per entry of qtypes")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    image: np.ndarray | None  # [H, W, 3] uint8 (None: made with with_image=False)
    question: str
    answer: str  # one word; two ("red circle") for object_at
    qtype: str
    objects: tuple[Obj, ...]
    answer_cells: tuple[tuple[int, int], ...]  # (row, col), 0-based
    params: dict  # the template's slots, e.g. {"row": 2, "col": 4} (0-based cells)
    seed: tuple[int, int, int]  # (seed, split id, index)

    def meta(self) -> dict:
        """JSON-able metadata (everything but the image)."""
        return {"question": self.question, "answer": self.answer, "qtype": self.qtype,
                "objects": [dataclasses.asdict(o) for o in self.objects],
                "answer_cells": [list(c) for c in self.answer_cells],
                "params": dict(self.params), "seed": list(self.seed)}


# ----------------------------------------------------------------------------- rendering

def _shape_mask(shape: str, size: int, half: float, cy: float, cx: float) -> np.ndarray:
    """Boolean [size, size] mask of `shape` centred at (cy, cx) with half-extent `half` (pixels)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u, v = (xx - cx) / half, (yy - cy) / half  # v grows downwards
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "triangle":  # apex up, base at v = 1
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "cross":
        arm = 0.34
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; allowed: {SHAPES}")


def render(objects: Sequence[Obj], rng: np.random.Generator, config: ShapesConfig,
           paint: bool = True) -> np.ndarray | None:
    """[H, W, 3] uint8 image: noisy grey background, grey distractors, then one shape per object.

    paint=False makes the same random draws (so `rng` ends in the same state) without drawing the
    shapes, and returns None: the questions of many examples without the cost of their images.
    """
    n, c = config.image_size, config.cell
    img = rng.normal(BACKGROUND, config.noise_std, size=(n, n, 1)).repeat(3, axis=2)
    for _ in range(int(rng.integers(0, config.max_distractors + 1))):
        grey = rng.uniform(85, 130)
        y, x = rng.integers(0, n, size=2)
        if rng.random() < 0.5:  # a 1-2 px speck
            s = int(rng.integers(1, 3))
            img[y:y + s, x:x + s] = grey
        else:  # a thin stroke across cells
            length = int(rng.integers(c // 2, 2 * c))
            if rng.random() < 0.5:
                img[y, x:x + length] = grey
            else:
                img[y:y + length, x] = grey
    for o in objects:
        half = c * rng.uniform(0.36, 0.46)
        slack = max(0.0, c / 2 - half - 0.5)
        cy, cx = c / 2 + rng.uniform(-slack, slack, size=2)
        rgb = np.asarray(COLOURS[o.colour], np.float32)
        rgb = rgb + rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
        if paint:
            tile = img[o.row * c:(o.row + 1) * c, o.col * c:(o.col + 1) * c]
            tile[_shape_mask(o.shape, c, half, cy, cx)] = rgb
    return np.clip(np.rint(img), 0, 255).astype(np.uint8) if paint else None


# ----------------------------------------------------------------------------- questions

def _cells(objs: Sequence[Obj]) -> tuple[tuple[int, int], ...]:
    return tuple((o.row, o.col) for o in objs)


def answer_question(qtype: str, params: dict, objects: Sequence[Obj]) -> tuple[str, tuple]:
    """(answer, answer_cells) of a question given by its type and template slots."""
    if qtype == "colour_of_shape":
        (o,) = [o for o in objects if o.shape == params["shape"]]
        return o.colour, _cells([o])
    if qtype in ("shape_at", "object_at"):
        cell = (params["row"], params["col"])
        hit = [o for o in objects if (o.row, o.col) == cell]
        if not hit:
            return NONE, (cell,)
        return (hit[0].shape if qtype == "shape_at" else f"{hit[0].colour} {hit[0].shape}"), (cell,)
    if qtype == "count":
        hit = [o for o in objects if o.colour == params["colour"]]
        return str(len(hit)), _cells(hit)
    if qtype == "exists":
        hit = [o for o in objects if (o.colour, o.shape) == (params["colour"], params["shape"])]
        return ("yes" if hit else "no"), _cells(hit)
    if qtype == "relative":
        (a,) = [o for o in objects if (o.colour, o.shape) == (params["colour"], params["shape"])]
        (b,) = [o for o in objects if (o.colour, o.shape) == (params["colour2"], params["shape2"])]
        if params["axis"] == "lr":
            return ("left" if a.col < b.col else "right"), _cells([a, b])
        return ("above" if a.row < b.row else "below"), _cells([a, b])
    raise ValueError(f"unknown question type {qtype!r}; allowed: {QTYPES}")


def _question_text(qtype: str, params: dict) -> str:
    if qtype in ("shape_at", "object_at"):  # 1-based in text
        return TEMPLATES[qtype].format(row=params["row"] + 1, col=params["col"] + 1)
    if qtype == "relative":
        return TEMPLATES["relative_" + params["axis"]].format(**params)
    return TEMPLATES[qtype].format(**params)


def _propose(qtype: str, objects: Sequence[Obj], rng: np.random.Generator, grid: int):
    """Template slots for `qtype` on this image, or None when the type does not apply."""
    if qtype == "colour_of_shape":
        unique = [s for s in SHAPES if sum(o.shape == s for o in objects) == 1]
        return {"shape": unique[rng.integers(len(unique))]} if unique else None
    if qtype in ("shape_at", "object_at"):
        # Half the questions ask an occupied cell: "none" would otherwise be ~90% of the answers.
        if rng.random() < 0.5:
            o = objects[rng.integers(len(objects))]
            return {"row": o.row, "col": o.col}
        r, c = rng.integers(0, grid, size=2)
        return {"row": int(r), "col": int(c)}
    if qtype == "count":
        return {"colour": COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]}
    if qtype == "exists":
        if rng.random() < 0.5:  # balanced yes / no
            o = objects[rng.integers(len(objects))]
            return {"colour": o.colour, "shape": o.shape}
        present = {(o.colour, o.shape) for o in objects}
        absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
        c, s = absent[rng.integers(len(absent))]
        return {"colour": c, "shape": s}
    if qtype == "relative":
        kinds = [(o.colour, o.shape) for o in objects]
        unique = [o for o in objects if kinds.count((o.colour, o.shape)) == 1]
        axis = "lr" if rng.random() < 0.5 else "ab"
        key = (lambda o: o.col) if axis == "lr" else (lambda o: o.row)
        pairs = [(a, b) for a in unique for b in unique if key(a) != key(b)]
        if not pairs:
            return None
        a, b = pairs[rng.integers(len(pairs))]
        return {"colour": a.colour, "shape": a.shape, "colour2": b.colour, "shape2": b.shape,
                "axis": axis}
    raise ValueError(f"unknown question type {qtype!r}; allowed: {QTYPES}")


# ----------------------------------------------------------------------------- examples

def make_example(index: int, split: str = "train", config: ShapesConfig = ShapesConfig(),
                 seed: int = 0, with_image: bool = True) -> Example:
    """Example `index` of `split`: a deterministic function of (seed, split, index, config).
    with_image=False: the same example with `image` None (about twice as fast; see `render`).
    A testbed-v3 config (`finegrained.FineConfig`) gives that testbed's example."""
    if not isinstance(config, ShapesConfig):
        from vkv_jax.testbed import finegrained

        return finegrained.make_example(index, split, config, seed, with_image)
    key = example_seed(split, index, seed)
    rng = np.random.default_rng(np.random.SeedSequence(key))
    g = config.grid
    n_obj = int(rng.integers(config.min_objects, config.max_objects + 1))
    flat = rng.choice(g * g, size=n_obj, replace=False)
    objects = tuple(Obj(SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOURS))],
                        int(i // g), int(i % g)) for i in sorted(flat))
    image = render(objects, rng, config, paint=with_image)
    return _ask(image, objects, rng, config, key)


def _ask(image, objects, rng, config, key) -> Example:
    w = np.ones(len(config.qtypes)) if config.qtype_weights is None else np.asarray(config.qtype_weights)
    w = w / w.sum()
    for _ in range(100):  # a type that does not apply to this image (no unique shape, ...) is redrawn
        qtype = config.qtypes[rng.choice(len(config.qtypes), p=w)]
        params = _propose(qtype, objects, rng, config.grid)
        if params is not None:
            break
    else:
        raise ValueError(f"question types {config.qtypes} cannot be asked about {objects}")
    answer, cells = answer_question(qtype, params, objects)
    return Example(image=image, question=_question_text(qtype, params), answer=answer, qtype=qtype,
                   objects=objects, answer_cells=cells, params=params, seed=key)


def more_questions(example: Example, n: int, config: ShapesConfig = ShapesConfig()) -> list[Example]:
    """`n` further questions about `example`'s image (same image and objects, for multi-turn
    training); question j is seeded by `example.seed + (j,)`, so it is deterministic too."""
    if not isinstance(config, ShapesConfig):
        from vkv_jax.testbed import finegrained

        return finegrained.more_questions(example, n, config)
    return [_ask(example.image, example.objects,
                 np.random.default_rng(np.random.SeedSequence(example.seed + (j,))), config, example.seed)
            for j in range(1, n + 1)]


def make_examples(split: str, n: int, start: int = 0, config: ShapesConfig = ShapesConfig(),
                  seed: int = 0, with_image: bool = True) -> list[Example]:
    """Examples `start .. start+n-1` of `split` (`with_image=False`: questions only, see `make_example`)."""
    return [make_example(i, split, config, seed, with_image) for i in range(start, start + n)]


def cells_to_patches(cells: Sequence[tuple[int, int]], config: ShapesConfig,
                     patch_size: int) -> list[int]:
    """Row-major visual-token indices of the patches covering `cells` (a cell may span k×k patches)."""
    if config.cell % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the cell size {config.cell}")
    k, per_row = config.cell // patch_size, config.image_size // patch_size
    return sorted((r * k + i) * per_row + c * k + j for r, c in cells
                  for i in range(k) for j in range(k))


def answer_vocab(config: ShapesConfig = ShapesConfig()) -> tuple[str, ...]:
    """Every possible answer word (an `object_at` answer is two of them)."""
    if not isinstance(config, ShapesConfig):
        from vkv_jax.testbed import finegrained

        return finegrained.answer_vocab(config)
    return (COLOUR_NAMES + SHAPES + (NONE, "yes", "no", "left", "right", "above", "below")
            + tuple(str(i) for i in range(config.max_objects + 1)))


# The second testbed (issue 16): 192-px images, 24-px cells of 3×3 patches (576 visual tokens with
# 8-px patches), and every question type, two-word `object_at` answers included. Same vocabulary.
TESTBED_V2 = ShapesConfig(image_size=192, qtypes=QTYPES)
CONFIG_FILE = "testbed.json"  # the ShapesConfig a model was trained on, beside its config.json


def save_config(config: ShapesConfig, directory) -> None:
    """Write `config` to `directory/testbed.json` (exported with a trained testbed model)."""
    import json
    import pathlib

    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    if not isinstance(config, ShapesConfig):  # testbed v3 (`finegrained.FineConfig`)
        fields = {"testbed": "v3", **fields}
    (pathlib.Path(directory) / CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n")


def config_for_model(directory, image_size: int | None = None) -> ShapesConfig:
    """The testbed config a model checkpoint was trained on: its `testbed.json`, else (a model without
    one, e.g. the shipped 64-token model or a random checkpoint) the default config at `image_size`."""
    import json
    import pathlib

    path = pathlib.Path(directory) / CONFIG_FILE if directory is not None else None
    if path is not None and path.is_file():
        fields = json.loads(path.read_text())
        if fields.pop("testbed", None) == "v3":
            from vkv_jax.testbed import finegrained

            return finegrained.FineConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()})
        return ShapesConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()})
    return ShapesConfig() if image_size is None else ShapesConfig(image_size=image_size)


ABLATIONS = ("blank", "shuffled")


def ablated_images(images: Sequence[Any], mode: str, image_size: int) -> list[Any]:
    """The images of an ablation run: "blank" (every image a background-grey [image_size]² square, the
    testbed's empty canvas) or "shuffled" (each question gets the next question's image; the last gets
    the first's)."""
    if mode == "blank":
        return [np.full((image_size, image_size, 3), BACKGROUND, np.uint8) for _ in images]
    if mode == "shuffled":
        return list(images[1:]) + list(images[:1])
    raise ValueError(f"unknown image ablation {mode!r}; allowed: {ABLATIONS}")
