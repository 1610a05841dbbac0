"""Compression methods and their registry.

`Compression("aircache", budget=0.1, **options)` names a method; `build(compression)` returns the
frozen method dataclass. The built-in methods are registered at the end of this module; a custom one
registers with `register` (`vkv_jax.methods.registry`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from vkv_jax import budgets
from vkv_jax.methods.base import (
    Full,
    KeepPlan,
    Method,
    PrefillContext,
    Reduction,
    Stage,
    reduction_schedule,
    visual_per_layer,
)
from vkv_jax.methods.registry import available, factory, register
from vkv_jax.methods.scorer import ScorerMethod


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
    """Raise ValueError on an unknown name, a bad option or an out-of-range budget (no tracing)."""
    if not isinstance(compression.name, str):
        raise ValueError(f"compression method name must be a str, got {compression.name!r}")
    factory(compression.name)  # an unknown name fails here
    if isinstance(compression.budget, (bool, numbers.Real)):  # a custom method may take other budget types
        budgets.check_budget(compression.budget)
    _construct(compression)


def _construct(compression: Compression) -> Method:
    kwargs = dict(compression.options)
    if compression.budget is not None:
        kwargs["budget"] = compression.budget
    try:
        method = factory(compression.name)(**kwargs)
    except TypeError as e:  # unknown option name
        raise ValueError(f"bad options for compression method {compression.name!r}: {e}") from None
    if not isinstance(method, Method):
        raise TypeError(f"compression method {compression.name!r} built a {type(method).__name__}, which does not "
                        "subclass vkv_jax.methods.base.Method")
    return method


def build(compression: Compression) -> Method:
    """The method dataclass for a request (raises ValueError on a bad name or budget)."""
    validate(compression)
    return _construct(compression)


def split_budget(method: Method, prompt_len: int, one_executable: bool = False) -> tuple[Method, jax.Array | None]:
    """(static method, traced budget value or None) for one compiled prefill serving many budgets.

    A method opts in with a `traced_budget` attribute: "none" when its capacity does not depend on the
    budget (VL-Cache, AirCache, AdaKV over such a scorer: the key holds only the budget's kind), "count"
    when its capacity is monotone in `budgets.static_count(budget, S)` (SnapKV, PyramidKV, H2O,
    StreamingLLM, random: the key holds the capacity bucket `budgets.count_bucket`, a power of two).
    Inside a jit, a traced budget's static page pool (`paging.static_pool`) is sized from that bucket, or
    for the full prompt without one; `generate` fits its pool to the kept slots instead.
    Other methods (CSP, FastV, custom ones) come back unchanged with None: their budget stays static.
    The value is float32 for a ratio, int32 for a count; `bind_budget` puts it back inside the trace.
    one_executable: a "count" method's capacity bound is the whole prompt instead of the budget's bucket, so
    one executable serves every budget (the evaluation's budget search; the pool reserves more).
    """
    kind, budget = method.traced_budget, method.budget
    if kind is None or budget is None or isinstance(budget, budgets.TracedBudget):
        return method, None
    ratio = budgets.is_ratio(budget)
    bound = None
    if kind == "count":
        bound = prompt_len if one_executable else budgets.count_bucket(budgets.static_count(budget, prompt_len),
                                                                       prompt_len)
    elif kind != "none":
        raise ValueError(f"{type(method).__name__}.traced_budget must be 'none', 'count' or None, got {kind!r}")
    static = dataclasses.replace(method, budget=budgets.TracedBudget(None, ratio=ratio, bound=bound))
    value = jnp.float32(budget) if ratio else jnp.int32(budget)
    return static, value


def bind_budget(method: Method, value: jax.Array | None) -> Method:
    """The static method of `split_budget` with its traced budget value put in (inside a jit trace)."""
    if value is None:
        return method
    return dataclasses.replace(method, budget=method.budget.replace(value=value))


register("full", Full)

# Each method module is a frozen dataclass; registering here keeps the modules free of import cycles.
from vkv_jax.methods.adakv import AdaKV  # noqa: E402
from vkv_jax.methods.aircache import AirCache  # noqa: E402
from vkv_jax.methods.csp import CSP  # noqa: E402
from vkv_jax.methods.fastv import FastV  # noqa: E402
from vkv_jax.methods.h2o import H2O  # noqa: E402
from vkv_jax.methods.lightkv import LightKV  # noqa: E402
from vkv_jax.methods.random_evict import Random  # noqa: E402
from vkv_jax.methods.snapkv import PyramidKV, SnapKV  # noqa: E402
from vkv_jax.methods.streamingllm import StreamingLLM  # noqa: E402
from vkv_jax.methods.vlcache import VLCache  # noqa: E402

for _name, _cls in (("random", Random), ("streamingllm", StreamingLLM), ("h2o", H2O),
                    ("snapkv", SnapKV), ("pyramidkv", PyramidKV), ("adakv", AdaKV),
                    ("vlcache", VLCache), ("aircache", AirCache), ("csp", CSP),
                    ("lightkv", LightKV), ("fastv", FastV)):
    register(_name, _cls)

__all__ = ["Compression", "KeepPlan", "Method", "PrefillContext", "Reduction", "ScorerMethod", "Stage", "available",
           "build", "factory", "reduction_schedule", "register", "visual_per_layer"]
