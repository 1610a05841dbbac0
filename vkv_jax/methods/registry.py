"""The method registry: name -> constructor of the method's frozen dataclass."""

from __future__ import annotations

from collections.abc import Callable

from vkv_jax.methods.base import Method

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str, factory: Callable[..., Method]) -> None:
    """Make `Compression(name, ...)` build `factory(budget=..., **options)`: a subclass of `Method` (the
    contract that declares every hook with its default), or a function returning one."""
    if isinstance(factory, type) and not issubclass(factory, Method):
        raise TypeError(f"method class {factory.__name__} must subclass vkv_jax.methods.base.Method (it declares "
                        "every hook the library calls, with its default)")
    _REGISTRY[name] = factory


def unregister(name: str) -> None:
    """Remove method `name` (KeyError if it is not registered): a notebook or a test that registered its own
    method leaves the registry as it found it."""
    del _REGISTRY[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


def factory(name: str) -> Callable[..., Method]:
    """The registered constructor of method `name` (ValueError for an unknown name)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown compression method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]
