"""Compression methods and their registry.

`Compression("aircache", budget=0.1, **options)` names a method; `build(compression)` returns the
frozen method dataclass. The built-in methods are registered at the end of this module; a custom one
registers with `register` (`vkv_jax.methods.registry`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import budgets
from vkv_jax.methods._common import heads_marker, slot_uniform
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
from vkv_jax.methods.registry import available, factory, register, unregister
from vkv_jax.methods.scorer import ScorerMethod


@dataclasses.dataclass(frozen=True)
class Compression:
    """A compression request: a registered method name, its budget, and method options.

    `budget` is a ratio in (0, 1] or an absolute token count (int > 1); what a ratio is a fraction of
    depends on the method (its docstring says). Any real number type is read by value: numpy floats of
    every width and 0-d float arrays are ratios, numpy integers and 0-d integer arrays counts; the budget is
    stored normalised (a Python float or int, `budgets.number`). Options are checked by the method's rules
    (`methods.options`) and stored as a sorted tuple so the whole request is hashable and can be a static jit
    argument. Raises ValueError (unknown name or option, a value out of range, a budget given to a method
    that takes none) or TypeError (a value of the wrong type) naming the value, before anything is traced.
    """

    name: str = "full"
    budget: float | int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __init__(self, name: str = "full", budget: float | int | None = None, **options):
        if _is_number(budget):  # a custom method may take other budget types: its constructor checks them
            budget = budgets.check_budget(budget)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        validate(self)


def _is_number(value) -> bool:
    """A bool or a number of any type (`budgets.number` reads it, or refuses a bool)."""
    if isinstance(value, (bool, np.bool_)):
        return True
    try:
        budgets.number(value)
    except TypeError:
        return False
    return True


def takes_budget(name: str) -> bool:
    """Whether method `name` takes a budget: not the full cache (keeps every token) nor a method whose
    dataclass says `budget: None` (LightKV: its schedule sets the compression). The command line asks this
    too, to name its --budget flag."""
    cls = factory(name)
    if cls is Full:
        return False
    field = {f.name: f for f in dataclasses.fields(cls)}.get("budget") if dataclasses.is_dataclass(cls) else None
    return field is None or field.type not in (None, "None")


def validate(compression: Compression) -> None:
    """Raise ValueError / TypeError on an unknown name, a bad option or budget (no tracing)."""
    if not isinstance(compression.name, str):
        raise TypeError(f"compression method name must be a str, got {compression.name!r}")
    cls = factory(compression.name)  # an unknown name fails here
    if compression.budget is not None and not takes_budget(compression.name):
        raise ValueError(f"budget {compression.budget!r} does not apply to compression method {compression.name!r}"
                         f" ({'the full cache keeps every token' if cls is Full else 'it takes no budget'}); "
                         "leave the budget out")
    if dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "budget"]
        unknown = [key for key, _ in compression.options if key not in fields]
        if unknown:
            raise ValueError(f"compression method {compression.name!r} has no option {unknown[0]!r}; its options: "
                             f"{', '.join(fields) or 'none'}")
    _construct(compression)


def _construct(compression: Compression) -> Method:
    kwargs = dict(compression.options)
    if compression.budget is not None:
        kwargs["budget"] = compression.budget
    cls = factory(compression.name)
    if dataclasses.is_dataclass(cls):  # option names were checked by `validate`: a TypeError is a value's
        method = cls(**kwargs)
    else:
        try:
            method = cls(**kwargs)
        except TypeError as e:  # a custom constructor: most likely an unknown option name
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
           "build", "factory", "heads_marker", "reduction_schedule", "register", "slot_uniform", "takes_budget",
           "unregister", "visual_per_layer"]
