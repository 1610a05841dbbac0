"""Ahead-of-time compiled executables, kept per process in a least-recently-used cache keyed by
function, static arguments and argument shapes / dtypes (never values: sampling settings, budgets and
answer lengths are traced or bucketed by the callers, so a long-lived process compiles a bounded set).

The cache holds at most `capacity()` executables (default 32, or the environment variable
`VKV_JAX_COMPILE_CACHE_SIZE` read at import; `set_capacity(n)` changes it at run time). The least
recently used executable is dropped when a new one would exceed it, together with the references JAX's
own caches keep to it (`_forget_lowerings`), so its memory is freed. `stats()` reports compiles, hits,
evictions and the current size.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import jax

DEFAULT_CAPACITY = 32
ENV_VAR = "VKV_JAX_COMPILE_CACHE_SIZE"


def _capacity_from_env() -> int:
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return DEFAULT_CAPACITY
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be an integer >= 1, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"{ENV_VAR} must be an integer >= 1, got {raw!r}")
    return n


_COMPILED: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_capacity = _capacity_from_env()
_counts = {"compiles": 0, "hits": 0, "evictions": 0}
_compiles_by_function: collections.Counter[str] = collections.Counter()


def compiled(fn, static: dict[str, Any], **args):
    """AOT-compile `fn` for these argument shapes once (while it stays in the cache); returns
    (executable, compile seconds — 0.0 on a hit). Call the executable with the same keyword arguments
    (the static ones left out)."""
    leaves, treedef = jax.tree.flatten(args)
    # shape, dtype, weak type, and where the argument lives (one executable per mesh layout and context mesh)
    key = (fn, tuple(sorted(static.items())), treedef, jax.sharding.get_abstract_mesh(),
           tuple((jax.typeof(a), getattr(a, "sharding", None)) for a in leaves))
    exe = _COMPILED.get(key)
    if exe is not None:
        _COMPILED.move_to_end(key)
        _counts["hits"] += 1
        return exe, 0.0
    start = time.perf_counter()
    exe = fn.lower(**args, **static).compile()
    seconds = time.perf_counter() - start
    _counts["compiles"] += 1
    _compiles_by_function[getattr(fn, "__name__", repr(fn))] += 1
    _COMPILED[key] = exe
    _evict(_capacity)
    return exe, seconds


def _evict(limit: int) -> None:
    while len(_COMPILED) > limit:
        (fn, *_), _ = _COMPILED.popitem(last=False)
        _counts["evictions"] += 1
        _forget_lowerings(fn)


def _forget_lowerings(fn) -> None:
    """JAX's own lowering cache (keyed on the traced jaxpr, which the jit function's trace cache keeps
    alive) holds every executable `lower().compile()` made; clearing the function's caches drops those
    references, so an evicted executable is freed. Executables still in this cache are unaffected (they
    are held here); direct calls of `fn` retrace and recompile once."""
    clear_cache = getattr(fn, "clear_cache", None)
    if clear_cache is not None:
        clear_cache()


def set_capacity(n: int) -> None:
    """Keep at most `n` (int >= 1) executables; evicts the least recently used ones now if needed."""
    global _capacity
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"compile cache capacity must be an integer >= 1, got {n!r}")
    _capacity = n
    _evict(n)


def capacity() -> int:
    return _capacity


def stats() -> dict[str, Any]:
    """{"compiles", "hits", "evictions"} since import (or `reset_stats`), "size" now, "capacity", and
    "compiles_by_function" ({function name: compiles}: which executables a workload compiled)."""
    return {**_counts, "size": len(_COMPILED), "capacity": _capacity,
            "compiles_by_function": dict(_compiles_by_function)}


def reset_stats() -> None:
    for name in _counts:
        _counts[name] = 0
    _compiles_by_function.clear()


def clear() -> None:
    """Forget every executable (the next call of each shape compiles again) and free them."""
    fns = {key[0] for key in _COMPILED}
    _COMPILED.clear()
    for fn in fns:
        _forget_lowerings(fn)
