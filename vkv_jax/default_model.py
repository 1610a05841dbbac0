"""The default model of `vkv_jax.load()` and `python -m vkv_jax.generate`.

The trained tiny LVLM ships inside the package at `vkv_jax/testbed/assets/tiny-llava` (HF LLaVA
layout), trained by `python -m vkv_jax.testbed.train` (see `vkv_jax/testbed/README.md`). Loading it
prints its measured test-split exact match once per process.
"""

from __future__ import annotations

import pathlib
import sys

SHIPPED = pathlib.Path(__file__).resolve().parent / "testbed" / "assets" / "tiny-llava"
# Greedy exact match of the shipped weights on test examples 0..999 (64-px shapes, seed 0), measured with
# `python -m vkv_jax.testbed.train --evaluate vkv_jax/testbed/assets/tiny-llava --split test --limit 1000`;
# tests/test_shipped_model.py fails if the shipped weights fall below it (minus a margin).
SHIPPED_TEST_EXACT_MATCH = 0.996
SHIPPED_QUESTION_ONLY_BASELINE = 0.42  # answering from the question alone (README)

_ANNOUNCED = False


def is_shipped() -> bool:
    return (SHIPPED / "config.json").exists()


def describe() -> str:
    """One line on what the shipped model is and how well it answers."""
    return (f"vkv_jax default model: the trained tiny LLaVA testbed model at {SHIPPED}; test-split exact match "
            f"{SHIPPED_TEST_EXACT_MATCH:.1%}, vs {SHIPPED_QUESTION_ONLY_BASELINE:.0%} answering from the "
            "question alone")


def path() -> str:
    """Directory of the shipped default checkpoint; announces it on stderr once per process."""
    global _ANNOUNCED
    if not is_shipped():
        raise FileNotFoundError(f"the default model is missing from this install (no {SHIPPED / 'config.json'}): "
                                "reinstall vkv_jax, or pass a checkpoint directory")
    if not _ANNOUNCED:
        print(describe(), file=sys.stderr)
        _ANNOUNCED = True
    return str(SHIPPED)
