"""How tokens and runs are named in figures."""

from __future__ import annotations

from explorer.trace import Trace


def show_token(text: str, limit: int = 14) -> str:
    """A token's text with whitespace made visible, shortened for axis and cell labels."""
    visible = text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")
    return visible if len(visible) <= limit else visible[: limit - 1] + "…"


def lane_name(trace: Trace, index: int) -> str:
    config = ", ".join(f"{k}={v}" for k, v in trace.started.config.items() if not _is_default_like(k, v))
    label = f"{index + 1}: {trace.started.strategy}"
    return f"{label} ({config})" if config else label


def _is_default_like(key: str, value: object) -> bool:
    neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
               "eta_cutoff": 0.0, "repetition_penalty": 1.0}
    return key in neutral and neutral[key] == value
