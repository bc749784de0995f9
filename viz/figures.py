"""Pure figures from traces: top-k heatmap, entropy/probability curves, lane divergence, Mirostat, Top-H."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.trace import Trace
from viz.labels import lane_name, show_token
from viz.theme import (
    DIFFERENT,
    FIRST_DIVERGENCE,
    LANE_COLORS,
    SAME,
    SEQUENTIAL,
    base_layout,
    empty_figure,
    lane_color,
    lane_dash,
    legend_keys,
)


def topk_heatmap(trace: Trace | None, max_steps: int = 200, lane: int = 0) -> go.Figure:
    """Steps on x, rank on y, colour = raw probability; a marker at the left edge of the chosen token's cell
    (it never covers the cell's text). Token text is written into cells only while it fits (hover always has
    it)."""
    if trace is None or not trace.token_steps:
        return empty_figure("Run something to see its per-step top-k distribution.")
    steps = trace.token_steps[:max_steps]
    k = max(len(s.top_ids) for s in steps)
    z = [[math.exp(s.top_logprobs[r]) if r < len(s.top_logprobs) else None for s in steps] for r in range(k)]
    width = 8 if len(steps) <= 16 else 4  # characters that fit in a cell at this many steps
    text = [[show_token(s.top_texts[r], width) if r < len(s.top_texts) else "" for s in steps] for r in range(k)]
    hover = [[f"step {s.step}<br>rank {r}: {s.top_texts[r]!r}<br>p = {math.exp(s.top_logprobs[r]):.4f}"
              if r < len(s.top_ids) else "" for s in steps] for r in range(k)]
    figure = go.Figure(go.Heatmap(
        z=z, x=[s.step for s in steps], y=list(range(k)), text=text,
        texttemplate="%{text}" if len(steps) <= 24 else None, textfont=dict(size=9), hovertext=hover,
        hoverinfo="text", colorscale=SEQUENTIAL, zmin=0, zmax=1, colorbar=dict(title="p"), xgap=1, ygap=1,
    ))
    chosen = [(s.step, s.rank) for s in steps if s.rank < k]
    figure.add_trace(go.Scatter(
        x=[c[0] - 0.42 for c in chosen], y=[c[1] for c in chosen], mode="markers", name="chosen token",
        marker=dict(symbol="triangle-right", size=8, color="#D55E00"), hoverinfo="skip",
    ))
    figure.update_yaxes(autorange="reversed", dtick=1)
    return base_layout(figure, f"Top-{k} per step — {lane_name(trace, lane)}", "step", "rank", height=420)


def entropy_curves(traces: Sequence[Trace]) -> go.Figure:
    """Entropy of the raw distribution and probability of the chosen token per step, all lanes overlaid."""
    traces = [t for t in traces if t is not None and t.token_steps]
    if not traces:
        return empty_figure("Run something to compare entropy and confidence across lanes.")
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.16,
                           subplot_titles=("entropy of the next-token distribution", "probability of the chosen token"))
    for index, trace in enumerate(traces):
        steps = trace.token_steps
        x = [s.step for s in steps]
        style = dict(color=lane_color(index), dash=lane_dash(index))
        name = lane_name(trace, index)
        tokens = [repr(s.token_text) for s in steps]
        figure.add_trace(go.Scatter(x=x, y=[s.entropy for s in steps], name=name, line=style, legendgroup=name,
                                    hovertext=tokens, hovertemplate="step %{x}: %{y:.3f} nats<br>%{hovertext}"),
                         row=1, col=1)
        figure.add_trace(go.Scatter(x=x, y=[math.exp(s.logprob) for s in steps], name=name, line=style,
                                    legendgroup=name, showlegend=False, hovertext=tokens,
                                    hovertemplate="step %{x}: p=%{y:.3f}<br>%{hovertext}"), row=2, col=1)
    base_layout(figure, "Entropy and confidence over steps", "", "", height=520)
    figure.update_yaxes(title_text="entropy (nats)", row=1, col=1)
    figure.update_yaxes(title_text="p(chosen)", range=[0, 1.02], row=2, col=1)
    figure.update_xaxes(title_text="step", row=2, col=1)
    return figure


@dataclass(frozen=True)
class Divergence:
    step: int
    reference_token: str
    lane_token: str
    margin: float | None  # p_ref(reference token) - p_ref(lane token) under the reference lane's distribution


def first_divergence(reference: Trace, lane: Trace) -> Divergence | None:
    """The first step where `lane` commits another token than `reference`, and the probability margin there."""
    for ref_step, step in zip(reference.token_steps, lane.token_steps, strict=False):
        if ref_step.token_id != step.token_id:
            p_ref = math.exp(ref_step.logprob)
            if step.token_id in ref_step.top_ids:
                margin = p_ref - math.exp(ref_step.top_logprobs[ref_step.top_ids.index(step.token_id)])
            else:
                margin = None  # outside the recorded top-k: the margin is at least p_ref - p_k
            return Divergence(ref_step.step, ref_step.token_text, step.token_text, margin)
    return None


def divergence_figure(traces: Sequence[Trace], max_steps: int = 120) -> go.Figure:
    """Lanes as rows, steps as columns: grey where a lane agrees with lane 1, orange where it differs, and a
    red marker at the first divergence with the probability margin in its hover."""
    traces = [t for t in traces if t is not None and t.token_steps]
    if len(traces) < 2:
        return empty_figure("Run two or more lanes to see where they diverge from lane 1.")
    reference = traces[0]
    figure = go.Figure()
    names = [lane_name(t, i) for i, t in enumerate(traces)]
    for index, trace in enumerate(traces):
        steps = trace.token_steps[:max_steps]
        same = [i < len(reference.token_steps) and reference.token_steps[i].token_id == s.token_id
                for i, s in enumerate(steps)]
        figure.add_trace(go.Scatter(
            x=[s.step for s in steps], y=[names[index]] * len(steps), mode="markers+text", showlegend=False,
            text=[show_token(s.token_text, 6) for s in steps], textposition="top center", textfont=dict(size=9),
            marker=dict(symbol="square", size=12, color=[SAME if ok else DIFFERENT for ok in same]),
            hovertext=[f"{s.token_text!r} ({'same as' if ok else 'differs from'} lane 1)"
                       for s, ok in zip(steps, same, strict=True)], hoverinfo="text",
        ))
        if index == 0:
            continue
        found = first_divergence(reference, trace)
        if found is not None:
            margin = "outside lane 1's top-k" if found.margin is None else f"{found.margin:.3f}"
            figure.add_trace(go.Scatter(
                x=[found.step], y=[names[index]], mode="markers", showlegend=False,
                marker=dict(symbol="diamond-open", size=20, color=FIRST_DIVERGENCE, line=dict(width=3)),
                hovertext=[f"first divergence at step {found.step}: lane 1 {found.reference_token!r} vs "
                           f"{found.lane_token!r}; margin p1 - p = {margin}"], hoverinfo="text",
            ))
    legend_keys(figure, [("same token as lane 1", SAME, "square"), ("another token", DIFFERENT, "square"),
                         ("first divergence", FIRST_DIVERGENCE, "diamond-open")])
    figure.update_yaxes(autorange="reversed", type="category")
    return base_layout(figure, "Divergence from lane 1", "step", "lane", height=160 + 70 * len(traces))


def _detail_series(trace: Trace, key: str) -> tuple[list[int], list[float]]:
    steps = [s for s in trace.token_steps if key in s.details]
    return [s.step for s in steps], [s.details[key] for s in steps]


def mirostat_figure(traces: Sequence[Trace]) -> go.Figure:
    """Observed surprise against the target tau, and the controller's mu, per step."""
    lanes = [(i, t) for i, t in enumerate(traces) if t is not None and t.has_step_detail("mu")]
    if not lanes:
        return empty_figure("Add a mirostat lane to see its surprise controller.")
    figure = go.Figure()
    for index, trace in lanes:
        name = lane_name(trace, index)
        x, surprise = _detail_series(trace, "surprise")
        _, mu = _detail_series(trace, "mu")
        color = lane_color(index)
        figure.add_trace(go.Scatter(x=x, y=surprise, mode="markers", name=f"{name}: observed surprise",
                                    marker=dict(color=color, size=5), hovertemplate="step %{x}: %{y:.2f} bits"))
        figure.add_trace(go.Scatter(x=x, y=mu, mode="lines", name=f"{name}: mu", line=dict(color=color, dash="dot"),
                                    hovertemplate="step %{x}: mu=%{y:.2f}"))
        running = [sum(surprise[: i + 1]) / (i + 1) for i in range(len(surprise))]
        figure.add_trace(go.Scatter(x=x, y=running, mode="lines", name=f"{name}: running mean surprise",
                                    line=dict(color=color), hovertemplate="step %{x}: mean %{y:.2f} bits"))
        figure.add_hline(y=trace.started.config["tau"], line=dict(color="#000000", dash="dash"),
                         annotation_text=f"tau = {trace.started.config['tau']}")
    return base_layout(figure, "Mirostat: surprise vs target", "step", "bits", height=420)


def top_h_figure(traces: Sequence[Trace]) -> go.Figure:
    """Kept-set size and the kept set's entropy against its bound, per step."""
    lanes = [(i, t) for i, t in enumerate(traces) if t is not None and t.has_step_detail("kept_entropy")]
    if not lanes:
        return empty_figure("Add a top_h lane to see its entropy-bounded kept sets.")
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.16,
                           subplot_titles=("kept-set size", "entropy: full distribution, bound, kept set"))
    for index, trace in lanes:
        name, color = lane_name(trace, index), lane_color(index)
        steps = trace.token_steps
        x = [s.step for s in steps]
        figure.add_trace(go.Bar(x=x, y=[s.kept_count for s in steps], name=f"{name}: kept", marker_color=color,
                                hovertemplate="step %{x}: %{y} tokens"), row=1, col=1)
        for key, dash, label in (("bound", "dash", "bound alpha·H"),
                                 ("kept_entropy", "solid", "kept-set entropy (as the bound measures it)")):
            sx, sy = _detail_series(trace, key)
            figure.add_trace(go.Scatter(x=sx, y=sy, name=f"{name}: {label}", line=dict(color=color, dash=dash),
                                        hovertemplate="step %{x}: %{y:.3f} nats"), row=2, col=1)
        figure.add_trace(go.Scatter(x=x, y=[s.entropy for s in steps], name=f"{name}: H(p)",
                                    line=dict(color="#777777", dash="dot"),
                                    hovertemplate="step %{x}: %{y:.3f} nats"), row=2, col=1)
    base_layout(figure, "Top-H: kept set and entropy bound", "", "", height=520)
    figure.update_yaxes(title_text="tokens", type="log", row=1, col=1)
    figure.update_yaxes(title_text="nats", row=2, col=1)
    figure.update_xaxes(title_text="step", row=2, col=1)
    return figure


def constraint_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """Constrained decoding: constraint evaluations per token (AWRS's walk vs the |V| a mask needs), and the
    importance weight log w per token beside the exact log Z where it was computed."""
    steps = [s for s in (trace.token_steps if trace is not None else []) if "evaluations" in s.details]
    if not steps:
        return empty_figure("Run a constrained lane to see how many constraint checks each token cost.")
    x = [s.step for s in steps]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                           subplot_titles=("constraint evaluations per token (log scale)",
                                           "log importance weight (estimate of log Z)"))
    tokens = [html.escape(show_token(s.token_text)) for s in steps]
    figure.add_trace(go.Bar(x=x, y=[s.details["evaluations"] for s in steps], name="this method",
                            marker_color=LANE_COLORS[0], hovertext=tokens,
                            hovertemplate="step %{x} (%{hovertext}): %{y} evaluations<extra></extra>"), row=1, col=1)
    if any("mask_evaluations" in s.details for s in steps):
        figure.add_trace(go.Scatter(x=x, y=[s.details.get("mask_evaluations") for s in steps], mode="lines",
                                    name="full mask (|V|)", line=dict(color="#999999", dash="dash"),
                                    hovertemplate="step %{x}: %{y} evaluations<extra>mask</extra>"), row=1, col=1)
    figure.add_trace(go.Scatter(x=x, y=[s.details["log_weight"] for s in steps], mode="markers", name="log w",
                                marker=dict(color=LANE_COLORS[1], size=8),
                                hovertemplate="step %{x}: log w = %{y:.2f}<extra></extra>"), row=2, col=1)
    if any("exact_log_z" in s.details for s in steps):
        figure.add_trace(go.Scatter(x=x, y=[s.details.get("exact_log_z") for s in steps], mode="lines",
                                    name="exact log Z", line=dict(color="#000000", shape="hv"),
                                    hovertemplate="step %{x}: log Z = %{y:.2f}<extra></extra>"), row=2, col=1)
    total = sum(s.details["evaluations"] for s in steps)
    base_layout(figure, f"Constraint checks — {lane_name(trace, lane)}: {total:.0f} evaluations for {len(steps)} "
                        "tokens", "", "", height=480)
    figure.update_yaxes(type="log", title_text="evaluations", row=1, col=1)
    figure.update_yaxes(title_text="log", row=2, col=1)
    figure.update_xaxes(title_text="step", row=2, col=1)
    return figure
