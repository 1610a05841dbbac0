"""Compression methods and their registry.

`Compression("aircache", budget=0.1, **options)` names a method; `build(compression)` returns the
frozen method dataclass. Each method module registers itself with `register`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from vkv_jax.methods.base import Full, KeepPlan, Method, PrefillContext

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str, factory: Callable[..., Method]) -> None:
    _REGISTRY[name] = factory


def available() -> list[str]:
    return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Compression:
    """A compression request: a registered method name, its budget, and method options.

    `budget` is a ratio in (0, 1] or an absolute token count (int > 1); what a ratio is a fraction of
    depends on the method (its docstring says). Options are stored as a sorted tuple so the whole
    request is hashable and can be a static jit argument.
    """

    name: str = "full"
    budget: float | int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __init__(self, name: str = "full", budget: float | int | None = None, **options):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        validate(self)


def validate(compression: Compression) -> None:
    if compression.name not in _REGISTRY:
        raise ValueError(
            f"unknown compression method {compression.name!r}; available: {', '.join(available())}")


def build(compression: Compression) -> Method:
    """The method dataclass for a request (raises ValueError on a bad name or budget)."""
    validate(compression)
    kwargs = dict(compression.options)
    if compression.budget is not None:
        kwargs["budget"] = compression.budget
    return _REGISTRY[compression.name](**kwargs)


register("full", Full)

__all__ = ["Compression", "KeepPlan", "Method", "PrefillContext", "available", "build", "register"]
