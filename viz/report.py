"""Figures across many runs (a sweep), drawn from the tables of explorer.metrics: speedup per method and prompt
category, and a quality map."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from explorer.metrics import SamplingTable, SpeedTable
from viz.theme import base_layout, empty_figure, lane_color, lane_dash


def speedup_figure(speed: SpeedTable) -> go.Figure:
    categories, table = speed
    if not table:
        return empty_figure("No finished runs.")
    figure = go.Figure()
    for index, (method, per) in enumerate(table.items()):
        values = [per.get(c, (math.nan, math.nan))[0] for c in categories]
        figure.add_trace(go.Bar(x=categories, y=values, name=method, marker_color=lane_color(index),
                                marker_pattern_shape=["", "/", ".", "x", "-", "|", "+", "\\"][index % 8],
                                hovertemplate=f"{method}<br>%{{x}}: %{{y:.2f}}x"))
    figure.add_hline(y=1.0, line=dict(color="#000000", dash="dot"))
    figure.update_layout(barmode="group")
    return base_layout(figure, "Speedup over greedy by prompt category", "prompt category", "speedup (x)")


def quality_figure(table: SamplingTable) -> go.Figure:
    if not table:
        return empty_figure("No finished runs.")
    figure = go.Figure()
    for index, (method, values) in enumerate(table.items()):
        figure.add_trace(go.Scatter(
            x=[values["perplexity"]], y=[values["repetition"]], mode="markers+text", name=method, text=[method],
            textposition="top center", marker=dict(size=10, color=lane_color(index),
                                                   symbol=["circle", "square", "diamond", "triangle-up", "x",
                                                           "cross", "star", "hexagon"][index % 8]),
            line=dict(dash=lane_dash(index)),
            hovertemplate=f"{method}<br>perplexity %{{x:.2f}}<br>4-gram repetition %{{y:.1%}}",
        ))
    figure.update_xaxes(type="log")
    return base_layout(figure, "Perplexity vs repetition per method", "perplexity (log)", "repeated 4-gram rate")
