"""What the command-line tools share: value parsers, up-front checks, the help formatter and the
user-error wrapper.

Every check here raises ValueError / FileNotFoundError naming the flag, the bad value and what is
expected; `run_cli` turns those into one `error: ...` line on stderr and exit code 2, as argparse does
for its own errors. The checks are cheap and import nothing heavy, so a tool runs them before it loads
a model or compiles anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vkv_jax import sampling
from vkv_jax.budgets import BUDGET_RULE, check_budget

_TRUE, _FALSE = ("true", "1"), ("false", "0")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose own errors (a bad flag, a value its `type` refuses) are one `error: ...` line
    on stderr and exit code 2, as `run_cli` prints the tool's errors (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" to an option's help unless the
    help already says "default: ...", or there is none to show (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or "default:" in text
                or isinstance(action, argparse._HelpAction)):  # noqa: SLF001 - argparse's own class
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


def description(doc: str) -> str:
    """A module docstring's first paragraph (up to the first blank line), for a parser's description."""
    return doc.strip().split("\n\n", 1)[0]


def parse_budget(text: str | float | int | None, flag: str = "--budget") -> float | int | None:
    """"0.1" -> 0.1 (a ratio), "64" -> 64 (a token count); None stays None. ValueError names `flag`."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a number; a budget is {BUDGET_RULE}") from None
    try:
        return check_budget(int(value) if value > 1 and value.is_integer() else value)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is out of range; a budget is {BUDGET_RULE}") from None


def parse_budgets(text: str, flag: str = "--budgets") -> list[float | int]:
    """A comma list of budgets ("0.1,0.25,64"); empty items are skipped."""
    return [parse_budget(item.strip(), flag) for item in text.split(",") if item.strip()]


def parse_names(text: str, flag: str, allowed: Sequence[str]) -> list[str]:
    """A comma list of names, each one of `allowed`; duplicates dropped, order kept."""
    names = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not names:
        raise ValueError(f"{flag} is empty; expected a comma list of {', '.join(allowed)}")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, bad))}; available: {', '.join(allowed)}")
    return names


def int_list(minimum: int = 1) -> Callable[[str], list[int]]:
    """argparse `type` for a comma list of integers >= minimum ("1,4")."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers >= {minimum}, got {text!r}") from None
        if any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= {minimum}, got {text!r}")
        return values

    parse.__name__ = "comma list of integers"
    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse `type` for one integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def real_at_least(minimum: float, strict: bool = False) -> Callable[[str], float]:
    """argparse `type` for one finite number >= minimum (> minimum with `strict`)."""
    bound = f"{'>' if strict else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def mesh_shape(text: str) -> tuple[int, int]:
    """argparse `type` for a device mesh DATAxMODEL, e.g. 1x8 (`vkv_jax.make_mesh(data, model)`)."""
    data, sep, model = text.lower().partition("x")
    if not sep or not data.strip().isdigit() or not model.strip().isdigit() or min(int(data), int(model)) < 1:
        raise argparse.ArgumentTypeError(f"expected DATAxMODEL with positive integers (e.g. 1x8), got {text!r}")
    return int(data), int(model)


mesh_shape.__name__ = "DATAxMODEL mesh"


def check_seed(seed: int, flag: str = "--seed") -> int:
    """`sampling.check_seed`, the message naming `flag`."""
    try:
        sampling.check_seed(seed)
    except ValueError as e:
        raise ValueError(f"{flag} {str(e).split(' ', 1)[1]}") from None
    return seed


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """The sampling flags, checked before the model loads (`sampling.check_sampling`, named as flags)."""
    try:
        sampling.check_sampling(temperature, top_k, top_p)
    except ValueError as e:
        name, rest = str(e).split(" ", 1)  # "top_k must be ..." -> "--top-k must be ..."
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """`path` is a folder or can become one (it is not an existing file)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {str(path)!r} is an existing file; expected a folder (it is created if missing)")


def check_input_file(path: str | os.PathLike, flag: str, what: str = "a file") -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {str(path)!r}: no such file (expected {what})")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {str(path)!r} is a folder; expected {what}")


def model_help() -> str:
    """--model's help: a checkpoint folder or a shipped model's name."""
    from vkv_jax.default_model import DEFAULT, SHIPPED_MODELS

    return (f"HF LLaVA checkpoint folder, or the name of a model shipped in the package ({', '.join(SHIPPED_MODELS)}) "
            f"(default: {DEFAULT.name})")


def check_model_dir(path: str | os.PathLike | None, flag: str = "--model") -> None:
    """None (the default model), the name of a shipped model, or an existing folder."""
    from vkv_jax.default_model import SHIPPED_MODELS

    if path is not None and not os.path.isdir(path) and os.fspath(path) not in SHIPPED_MODELS:
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{flag} {str(path)!r} {what}; expected a HF LLaVA checkpoint folder or a "
                                f"shipped model's name ({', '.join(SHIPPED_MODELS)})")


# ------------------------------------------------------------------------------------- method options

def _coercer(field: dataclasses.Field) -> tuple[str, Callable[[str], Any]] | None:
    """(type name, str -> value) for a method option field: its rule's (`vkv_jax.methods.options`, the
    rules the method itself checks), else from its default's type (or, for a None default, its annotation);
    None when nothing says (the value is then inferred)."""
    from vkv_jax.methods.options import rule_of

    rule = rule_of(field)
    if rule is not None:
        return rule.describe(cli=True), rule.parse
    default = field.default
    if isinstance(default, bool):
        return "a boolean (true, false, 1 or 0)", _bool
    for kind, name in ((int, "an integer"), (float, "a number"), (str, "a string")):
        if type(default) is kind:
            return name, kind
    if default is None:  # e.g. `query_rows: int | None = None`
        base = str(field.type).replace(" ", "").replace("|None", "").replace("None|", "")
        kinds = {"int": (int, "an integer or none"), "float": (float, "a number or none"),
                 "bool": (_bool, "a boolean or none"), "str": (str, "a string or none")}
        if base in kinds:
            kind, name = kinds[base]
            return name, lambda text: None if text.lower() == "none" else kind(text)
    return None


def _bool(text: str) -> bool:
    if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    raise ValueError(text)


def _infer(text: str) -> Any:
    """bool, int or float when the text reads as one, else the text (e.g. "12-18-24")."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_fields(method: str) -> dict[str, dataclasses.Field] | None:
    """The option fields (all but `budget`) of a registered method's dataclass; None when the method's
    constructor is not a dataclass. Raises ValueError for an unknown method."""
    from vkv_jax.methods import factory

    cls = factory(method)
    if not dataclasses.is_dataclass(cls):
        return None
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "budget"}


def parse_options(items: Sequence[str], method: str | None = None) -> dict[str, Any]:
    """KEY=VALUE strings -> method options.

    With `method`, each value is converted to the type of that option's default (booleans accept true,
    false, 1, 0 only) and an unknown key is an error listing the method's options. Without it (or for
    options whose default says nothing, like a tuple), values become bool, int or float when they read
    as one and stay strings otherwise.
    """
    from vkv_jax.methods.options import rule_of

    fields = method_fields(method) if method is not None else None
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option wants KEY=VALUE, got {item!r}")
        if key == "budget":
            raise ValueError("--option budget=...: give the budget with --budget")
        if fields is not None and key not in fields:
            raise ValueError(f"--option {item!r}: {method} has no option {key!r}; its options: "
                             f"{', '.join(fields) or 'none'}")
        coerce = _coercer(fields[key]) if fields is not None else None
        if coerce is None:
            options[key] = _infer(text)
            continue
        name, convert = coerce
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"--option {item!r}: {method}'s {key} must be {name}, got {text!r}") from None
        rule = rule_of(fields[key])
        if rule is not None:  # the range, by the rule the method checks too
            try:
                value = rule.check(value, f"{method}'s {key}")
            except (TypeError, ValueError) as e:
                raise ValueError(f"--option {item!r}: {e}") from None
        options[key] = value
    return options


def run_cli(body: Callable[[Any], int], args: Any) -> int:
    """Run a CLI body; a user error (a bad value, type, option or path: ValueError, TypeError, OSError such as
    FileNotFoundError or IsADirectoryError) is one `error: ...` line on stderr and exit code 2, not a
    traceback."""
    try:
        return body(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
