"""Errors with a sentence for the user and a hint for the fix.

The core raises these and never prints; each boundary (CLI, tab, HTTP API)
turns them into a line, a banner or a JSON body.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DreamboothError(Exception):
    """A problem the user can act on: `message` says what, `hint` says how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip() if self.hint else self.message


class ConfigError(DreamboothError):
    """The configuration has one or more invalid values (all of them in `problems`)."""

    def __init__(self, problems: list) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"The training configuration has {len(self.problems)} problem(s):\n{lines}")


class CheckpointError(DreamboothError):
    """A source checkpoint can't be read, is unsafe, or is not what was chosen."""


class DataError(DreamboothError):
    """Instance or class images can't be used."""


class TrainingError(DreamboothError):
    """Training stopped on a fault (NaN loss, out of memory, ...)."""


class BugError(DreamboothError):
    """Something failed that the project did not foresee: a bug. The message names the log file
    that holds the traceback."""


@dataclass(frozen=True)
class Problem:
    """One invalid value: which field, what value, why, and what to do."""

    field: str
    value: Any
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field} = {short_repr(self.value)}: {self.why}; {self.fix}"


def short_repr(value: Any, limit: int = 80) -> str:
    """A value as a user sees it in a message: at most `limit` characters, whatever it holds
    (a 5000-digit number, a 100 MB string, lone surrogates, deep nesting)."""
    if isinstance(value, str):
        text = repr(value[:limit])
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        text = f"a number of about {int(value.bit_length() * 0.30103)} digits"
    else:
        try:
            text = repr(value)
        except (ValueError, RecursionError, MemoryError):
            text = f"a {type(value).__name__}"
        if len(text) > limit and isinstance(value, (list, dict, tuple)):
            text = f"a {type(value).__name__} of {len(value)} item(s)"
    return text if len(text) <= limit else text[:limit - 3] + "..."
