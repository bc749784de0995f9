"""Declared parameters: a config field carries its help text and limits (`minimum`, `maximum`, `step`,
`choices`) in its metadata. The UI builds its controls from them, and `check_limits` enforces them, once and
generically, for every config: no config re-checks a bound its fields already declare.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MAX_TEXT_PARAM = 256  # characters of a text parameter (layer lists, model ids, widths)
MAX_TREE_NODES = 128  # draft nodes verified in one target pass (its memory and time grow with them)


def param(default: Any, help: str, **limits: Any) -> Any:
    """A config field with a help text and optional limits: `minimum`, `maximum`, `step`, `choices`,
    `max_length` (text), `model=True` for a field that names a model to load (a server checks those
    against its allow-list), and `crosses_runs=True` for a switch that lets a run see state earlier runs left
    (a server shared by strangers refuses those)."""
    return field(default=default, metadata={"help": help, **limits})


def check_prompt(prompt: str) -> None:
    """Refuse an empty prompt (or one of whitespace only) before anything runs."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type some text to continue")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the prompt is not valid UTF-8 text") from None


def one_line(error: BaseException, limit: int = 200) -> str:
    """An error from code we do not own (a plugin, a processor, the Hub) as one line for the user: its type and
    the first line of its message, at most `limit` characters, control characters blanked."""
    first = (str(error).strip().splitlines() or [""])[0][:limit]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return "".join(c if c.isprintable() else " " for c in text)


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_limits(config: Any) -> None:
    """Raise ValueError naming the field and its range for the first value outside its declared limits."""
    for spec in dataclasses.fields(config):
        value, meta = getattr(config, spec.name), spec.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{spec.name} must be a finite number, got {value}")
        if isinstance(value, str) and len(value) > meta.get("max_length", MAX_TEXT_PARAM):
            raise ValueError(f"{spec.name} is longer than {meta.get('max_length', MAX_TEXT_PARAM)} characters")
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
        nodes = self.draft_nodes()
        if nodes > MAX_TREE_NODES:
            raise ValueError(f"these settings draft {nodes} nodes per round; the limit is {MAX_TREE_NODES}: "
                             "use a smaller tree")

    def draft_nodes(self) -> int:
        """Draft tokens verified in one target pass at most (0 for strategies that do not draft)."""
        return 0

    def check_cost(self, max_new_tokens: int) -> None:
        """Refuse a run whose cost grows past a declared limit with the length (e.g. beams x new tokens);
        the default has no such cost. Costs of the config alone (tree nodes) are checked on construction."""
        return None
