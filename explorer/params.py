"""Declared parameters: a config field carries its help text and limits (`minimum`, `maximum`, `step`,
`choices`) in its metadata. The UI builds its controls from them, and `check_limits` enforces them, once and
generically, for every config: no config re-checks a bound its fields already declare.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def param(default: Any, help: str, **limits: Any) -> Any:
    """A config field with a help text (and optional `minimum`, `maximum`, `step`, `choices`) for UIs."""
    return field(default=default, metadata={"help": help, **limits})


def check_prompt(prompt: str) -> None:
    """Refuse an empty prompt (or one of whitespace only) before anything runs."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type some text to continue")


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_limits(config: Any) -> None:
    """Raise ValueError naming the field and its range for the first value outside its declared limits."""
    for spec in dataclasses.fields(config):
        value, meta = getattr(config, spec.name), spec.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{spec.name} must be a finite number, got {value}")
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{spec.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        low, high = meta.get("minimum"), meta.get("maximum")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"[{_number(low)}, {_number(high)}]" if low is not None and high is not None else (
                f">= {_number(low)}" if low is not None else f"<= {_number(high)}")
            raise ValueError(f"{spec.name} must be in {span}, got {_number(value)}")


@dataclass(frozen=True)
class Checked:
    """Base of every config: its declared limits are checked on construction. Subclasses that need more (open
    intervals, relations between fields) check that in their own `__post_init__` and call this one."""

    def __post_init__(self) -> None:
        check_limits(self)
