"""The models shipped inside the package, loadable by name (`SHIPPED_MODELS`): the default of
`vkv_jax.load()` and `python -m vkv_jax.generate`, the tiny LLaVA with 64 visual tokens ("tiny-llava"),
and the testbed-v2 model with 576 visual tokens per prompt ("tiny-llava-576"; `vkv_jax/testbed/README.md`).

A shipped model is a tiny LVLM trained on the shapes testbed by `python -m vkv_jax.testbed.train` and
stored at `vkv_jax/testbed/assets/<name>` in the HF LLaVA layout. Loading one prints its measured
test-split exact match once per process.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

ASSETS = pathlib.Path(__file__).resolve().parent / "testbed" / "assets"


@dataclasses.dataclass(frozen=True)
class ShippedModel:
    name: str
    summary: str
    # greedy exact match of the shipped weights on test examples 0..999 of its testbed (seed 0), measured
    # with `python -m vkv_jax.testbed.train --evaluate <dir> --split test --limit 1000`; the shipped-model
    # tests fail if the weights fall below it (minus a margin)
    test_exact_match: float
    question_only_baseline: float  # answering from the question alone (testbed README)

    @property
    def directory(self) -> pathlib.Path:
        return ASSETS / self.name


DEFAULT = ShippedModel("tiny-llava", "the trained tiny LLaVA testbed model (64 visual tokens)", 0.996, 0.42)
V2 = ShippedModel("tiny-llava-576", "the tiny LLaVA trained on testbed v2 (192-px images, 576 visual tokens, "
                  "two-word answers)", 0.965, 0.42)
SHIPPED_MODELS = {m.name: m for m in (DEFAULT, V2)}

# the default model, under the names the rest of the package and its tests use
SHIPPED = DEFAULT.directory
SHIPPED_TEST_EXACT_MATCH = DEFAULT.test_exact_match
SHIPPED_QUESTION_ONLY_BASELINE = DEFAULT.question_only_baseline

_ANNOUNCED: set[str] = set()


def is_shipped(name: str = DEFAULT.name) -> bool:
    return name in SHIPPED_MODELS and (SHIPPED_MODELS[name].directory / "config.json").exists()


def describe(name: str = DEFAULT.name) -> str:
    """One line on what a shipped model is and how well it answers."""
    m = SHIPPED_MODELS[name]
    return (f"vkv_jax shipped model {m.name!r}: {m.summary} at {m.directory}; test-split exact match "
            f"{m.test_exact_match:.1%}, vs {m.question_only_baseline:.0%} answering from the question alone")


def path(name: str = DEFAULT.name) -> str:
    """Directory of a shipped checkpoint (default: the default model); announces it on stderr once per
    process."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model named {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    if not is_shipped(name):
        raise FileNotFoundError(f"the shipped model {name!r} is missing from this install (no "
                                f"{SHIPPED_MODELS[name].directory / 'config.json'}): reinstall vkv_jax, or pass a "
                                "checkpoint directory")
    if name not in _ANNOUNCED:
        print(describe(name), file=sys.stderr)
        _ANNOUNCED.add(name)
    return str(SHIPPED_MODELS[name].directory)


def resolve(path_or_name: str | os.PathLike | None) -> str:
    """A checkpoint directory from what a user passed: None (the default model), the name of a shipped
    model that is not also a folder here, or a folder."""
    if path_or_name is None:
        return path()
    text = os.fspath(path_or_name)
    if text in SHIPPED_MODELS and not os.path.isdir(text):
        return path(text)
    return text
