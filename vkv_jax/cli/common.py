"""What the command-line tools share: value parsers and the user-error wrapper."""

from __future__ import annotations

import sys
from typing import Any


def parse_budget(text: str | None) -> float | int | None:
    if text is None:
        return None
    value = float(text)
    return int(value) if value.is_integer() and value > 1 else value


def parse_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> options; values become bool, int or float when they read as one."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option wants KEY=VALUE, got {item!r}")
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        options[key] = value
    return options


def run_cli(body, args) -> int:
    """Run a CLI body; a user error (bad path, value or option) is one line on stderr and exit code 2,
    not a traceback."""
    try:
        return body(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
