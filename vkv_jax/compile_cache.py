"""Ahead-of-time compiled executables, kept per process and keyed by function, static arguments and
argument shapes."""

from __future__ import annotations

import time
from typing import Any

import jax

_COMPILED: dict[Any, Any] = {}


def compiled(fn, static: dict[str, Any], **args):
    """AOT-compile `fn` for these argument shapes once per process; returns (executable, compile seconds).
    Call the executable with the same keyword arguments (the static ones left out)."""
    leaves, treedef = jax.tree.flatten(args)
    key = (fn, tuple(sorted(static.items())), treedef, tuple((a.shape, str(a.dtype)) for a in leaves))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    exe = fn.lower(**args, **static).compile()
    _COMPILED[key] = exe
    return exe, time.perf_counter() - start


def clear() -> None:
    """Forget every executable (the next call of each shape compiles again)."""
    _COMPILED.clear()
