"""The rules of method options: one `Rule` per option (its type and range), declared on the method's
dataclass field (`option(default, rule)`), checked when the method is built (`check_fields`, from the
method's `__post_init__`) and used by the command line to read `--option KEY=VALUE` (`Rule.parse`).

Types are read by value whatever their width: an integer option takes a Python or numpy integer (or a 0-d
integer array), a number option any real (numpy floats of every width, integers); a boolean option takes
only a bool; a choice only one of its strings. A value of the wrong type is a TypeError, one out of range a
ValueError, both naming the method, the option and the value. Rules between options ("does not apply"
cases, e.g. beta_min <= beta_max) stay in the method's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from vkv_jax import budgets
from vkv_jax.pallas_kernels import IMPLS

_TRUE, _FALSE = ("true", "1"), ("false", "0")
_KINDS = ("int", "float", "bool", "choice", "budget")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one option accepts.

    kind:     "int", "float" (any real), "bool", "choice" (one of `choices`) or "budget" (`budgets.check_budget`)
    lo, hi:   inclusive bounds (None: unbounded); lo_open / hi_open make them exclusive
    optional: None is accepted too
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"Rule kind must be one of {_KINDS}, got {self.kind!r}")

    def describe(self, cli: bool = False) -> str:
        """e.g. "an integer >= 1", "a number in (0, 1]", "a boolean", "one of 'max', 'avg'" (+ " or None");
        `cli`: as the command line spells the values (true/false/1/0, none)."""
        if self.kind == "budget":
            return budgets.BUDGET_RULE
        if self.kind == "bool":
            text = "a boolean (true, false, 1 or 0)" if cli else "a boolean (True or False)"
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            text = "an integer" if self.kind == "int" else "a number"
            if self.lo is not None and self.hi is not None:
                left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
                text += f" in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
            elif self.lo is not None:
                text += f" {'>' if self.lo_open else '>='} {_num(self.lo)}"
            elif self.hi is not None:
                text += f" {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return text + ((" or none" if cli else " or None") if self.optional else "")

    def check(self, value: Any, what: str) -> Any:
        """`value` normalised (int, float, bool, str or None); TypeError / ValueError naming `what` and it."""
        if value is None and self.optional:
            return None
        if self.kind == "budget":
            return budgets.check_budget(value, what)
        if self.kind == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{what} must be {self.describe()}, got {value!r}")
            return bool(value)
        if self.kind == "choice":
            if not isinstance(value, str):
                raise TypeError(f"{what} must be {self.describe()}, got {value!r}")
            if value not in self.choices:
                raise ValueError(f"{what} must be {self.describe()}, got {value!r}")
            return value
        try:
            x = budgets.number(value)
        except TypeError:
            raise TypeError(f"{what} must be {self.describe()}, got {value!r}") from None
        if self.kind == "int":
            if not isinstance(x, int):
                raise TypeError(f"{what} must be {self.describe()}, got {value!r}")
        else:
            x = float(x)
            if not math.isfinite(x):
                raise ValueError(f"{what} must be {self.describe()}, got {value!r}")
        if not self._in_range(x):
            raise ValueError(f"{what} must be {self.describe()}, got {value!r}")
        return x

    def _in_range(self, x) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or not (x >= self.hi if self.hi_open else x > self.hi)

    def parse(self, text: str) -> Any:
        """A command-line value ("3", "0.5", "true", "none", "max") as this rule's type; ValueError when it
        does not read as one (the caller names `describe(cli=True)`). The range is `check`'s."""
        if self.optional and text.strip().lower() == "none":
            return None
        if self.kind == "bool":
            if text.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.strip().lower() in _TRUE
        if self.kind == "choice":
            return text
        if self.kind == "int":
            return int(text)
        return float(text)


def _num(x: float) -> str:
    return f"{x:g}" if abs(x) < 1e6 else str(int(x))


def option(default: Any, rule: Rule) -> Any:
    """A method dataclass field with its rule: `window: int = option(32, Rule("int", lo=1))`."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def rule_of(field: dataclasses.Field) -> Rule | None:
    return field.metadata.get("rule")


def check_fields(method: Any, name: str | None = None) -> None:
    """Check every ruled field of a method dataclass and store its normalised value (from `__post_init__`;
    a frozen dataclass is set through object.__setattr__). `name`: the method's name in messages (default:
    its class name, lower case)."""
    name = name or type(method).__name__.lower()
    for field in dataclasses.fields(method):
        rule = rule_of(field)
        if rule is not None:
            value = rule.check(getattr(method, field.name), f"{name}'s {field.name}")
            object.__setattr__(method, field.name, value)


# Rules several methods share.
BUDGET = Rule("budget")
IMPL = Rule("choice", choices=tuple(IMPLS))  # where window_scores runs: the kernel, its jnp reference, or auto
FRACTION = Rule("float", lo=0.0, hi=1.0)  # [0, 1]
SHARE = Rule("float", lo=0.0, hi=1.0, lo_open=True)  # (0, 1]
POSITIVE_INT = Rule("int", lo=1)
BOOL = Rule("bool")
