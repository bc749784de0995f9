"""Top-nσ sampling as a plugin: a strategy with a parameter, and a view of what it recorded.

Tang, Liu, Xu, Huang 2024, "Top-nσ: Not All Logits Are You Need", arXiv:2411.07641, Algorithm 1.
Notation: l = the logits, T = temperature, M = max(l / T), σ = the standard deviation of l / T over the
vocabulary, n = the threshold in standard deviations.
1. l' = l / T.  2. Keep the tokens with l'_i >= M - nσ (the top token always).  3. Sample from softmax over them.
Since M and σ both scale with 1/T, the kept set does not depend on T; only the draw inside it does.

Run it: `python -m explorer --plugin examples/plugins/top_nsigma.py run --strategy top_nsigma --param n=1.5
--prompt "Once upon a time"` (README, "Your own method").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch

from explorer.api import (
    Checked,
    Choice,
    Event,
    Trace,
    View,
    autoregressive,
    base_layout,
    empty_figure,
    lane_color,
    param,
    pick,
    register,
    register_view,
)


@dataclass(frozen=True)
class TopNSigmaConfig(Checked):
    n: float = param(1.0, "keep tokens whose logit is within n standard deviations of the top one", minimum=0.0,
                     maximum=5.0, step=0.1)
    temperature: float = param(1.0, "divide logits by this (> 0): changes the draw, not the kept set",
                               minimum=0.05, maximum=3.0, step=0.05)


def top_nsigma_filter(logits: torch.Tensor, n: float) -> tuple[torch.Tensor, float, float]:
    """Step 2: the logits `(vocab,)` with every token below max - n·σ at -inf, σ and the threshold."""
    sigma = float(logits.std())
    threshold = float(logits.max()) - n * sigma
    return logits.masked_fill(logits < threshold, float("-inf")), sigma, threshold


@register("top_nsigma", TopNSigmaConfig, "top-nσ: keep the tokens within nσ of the top logit",
          family="sampling", paper="Tang et al. 2024, Top-nσ, arXiv:2411.07641")
def run(model: Any, prompt_ids: Sequence[int], config: TopNSigmaConfig, rng: torch.Generator) -> Iterator[Event]:
    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        scaled = logits / config.temperature  # 1.
        kept, sigma, threshold = top_nsigma_filter(scaled, config.n)  # 2.
        token = int(torch.multinomial(torch.softmax(kept, dim=-1), 1, generator=rng))  # 3.
        return Choice(token, kept, {"nsigma_sigma": sigma, "nsigma_threshold": threshold,
                                    "nsigma_top": float(scaled.max())})

    yield from autoregressive(model, prompt_ids, choose)


def _recorded(trace: Trace) -> bool:
    return trace.has_step_detail("nsigma_sigma")


def nsigma_figure(traces: Sequence[Trace | None], lane: int) -> go.Figure:
    """Per step: how many tokens the nσ band kept, and the band itself (top logit down to the threshold)."""
    trace = pick(traces, lane, _recorded)
    if trace is None:
        return empty_figure("Add a top_nsigma lane to see its kept band per step.")
    index = next(i for i, t in enumerate(traces) if t is trace)
    steps = [s for s in trace.token_steps if "nsigma_sigma" in s.details]
    x = [s.step for s in steps]
    figure = go.Figure()
    figure.add_trace(go.Bar(x=x, y=[s.kept_count for s in steps], name="kept tokens", yaxis="y2", opacity=0.35,
                            marker_color=lane_color(index), hovertemplate="step %{x}: %{y} tokens kept"))
    figure.add_trace(go.Scatter(x=x, y=[s.details["nsigma_top"] for s in steps], mode="lines", name="top logit M",
                                line=dict(color=lane_color(index)), hovertemplate="step %{x}: M = %{y:.2f}"))
    figure.add_trace(go.Scatter(x=x, y=[s.details["nsigma_threshold"] for s in steps], mode="lines",
                                name="threshold M - nσ", line=dict(color=lane_color(index), dash="dash"),
                                hovertemplate="step %{x}: M - nσ = %{y:.2f}"))
    base_layout(figure, f"Top-nσ (lane {index + 1}): the kept band per step", "step", "logit / T", height=400)
    figure.update_layout(yaxis2=dict(title="tokens kept", overlaying="y", side="right", rangemode="tozero"))
    return figure


register_view(View("top-nsigma", "Sampling", "top-nσ kept band", nsigma_figure))
