"""How tokens and runs are named in figures."""

from __future__ import annotations

import html

from explorer.trace import Trace


def show_token(text: str, limit: int = 14) -> str:
    """A token's text with whitespace made visible, shortened for axis and cell labels."""
    visible = text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")
    return visible if len(visible) <= limit else visible[: limit - 1] + "…"


def lane_name(trace: Trace, index: int) -> str:
    """'2: sample (top_p=0.9)': the lane number, the strategy, and only the parameters changed from their
    defaults (for runs stored before defaults were recorded: those that are not a neutral sampling value)."""
    started = trace.started
    if "external" in started.tags:  # an imported engine record: its method label and engine
        method, engine = started.tags.get("method", ""), started.tags["external"]
        return html.escape(f"{index + 1}: {method} ({engine})" if method != engine else f"{index + 1}: {engine}")
    changed = {k: v for k, v in started.config.items()
               if (started.defaults.get(k, _MISSING) != v if started.defaults else not _is_default_like(k, v))}
    config = html.escape(", ".join(f"{k}={_short(v)}" for k, v in changed.items()))  # values may be typed text
    label = f"{index + 1}: {started.strategy}"
    return f"{label} ({config})" if config else label


_MISSING = object()


def _short(value: object, limit: int = 24) -> str:
    text = str(value)
    return text if len(text) <= limit else "…" + text[-(limit - 1):]  # paths: their end says most


def _is_default_like(key: str, value: object) -> bool:
    neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
               "eta_cutoff": 0.0, "repetition_penalty": 1.0}
    return key in neutral and neutral[key] == value
