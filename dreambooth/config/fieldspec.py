"""How a config field carries its text and limits (standard library only)."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def spec_field(default: Any, help: str, *, advanced: bool = False, choices: tuple = (),
               minimum: float | None = None, maximum: float | None = None) -> Any:
    """A dataclass field with the text and limits the UI, the README and validate() use."""
    meta = {"help": help, "advanced": advanced, "choices": choices,
            "minimum": minimum, "maximum": maximum}
    return field(default=default, metadata=meta)
