"""Figures across many runs (a sweep), drawn from the tables of explorer.metrics: speedup per method and prompt
category, SPEED-Bench's acceptance matrix, and a quality map."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from explorer.metrics import AcceptanceMatrix, SamplingTable, SpeedTable
from viz.theme import SEQUENTIAL, base_layout, empty_figure, lane_color, lane_dash


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


def acceptance_matrix_figure(matrix: AcceptanceMatrix) -> go.Figure:
    """Method x category heatmap of vLLM's mean acceptance length (bonus included, pooled over the runs), each
    cell annotated with its value; Cividis (colour-blind safe, monotone in lightness), from 1 (nothing accepted)
    up. Hover adds the draft acceptance rate and the runs and drafts pooled."""
    categories, table = matrix
    if not table:
        return empty_figure("No run drafted: run a speculative method to see its acceptance per category.")
    methods = list(table)
    cells = [[table[m].get(c) for c in categories] for m in methods]
    z = [[cell.mean_acceptance_length if cell else None for cell in row] for row in cells]
    text = [[f"{v:.2f}" if v is not None else "" for v in row] for row in z]
    hover = [[f"{m} / {c}<br>mean acceptance length {cell.mean_acceptance_length:.2f}<br>draft acceptance "
              + (f"{cell.draft_acceptance_rate:.1%}" if cell.draft_acceptance_rate is not None else "n/a")
              + f"<br>{cell.runs} runs, {cell.drafts} drafts"
              if cell and cell.mean_acceptance_length is not None else f"{m} / {c}: no drafts"
              for c, cell in zip(categories, row, strict=True)] for m, row in zip(methods, cells, strict=True)]
    top = max((v for row in z for v in row if v is not None), default=1.0)
    figure = go.Figure(go.Heatmap(
        z=z, x=categories, y=methods, text=text, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
        colorscale=SEQUENTIAL, zmin=1.0, zmax=max(top, 1.0 + 1e-9), xgap=2, ygap=2,
        colorbar=dict(title="mean acc. length"),
    ))
    figure.update_yaxes(autorange="reversed")
    return base_layout(figure, "Mean acceptance length per method and prompt category (vLLM's, bonus included)",
                       "prompt category", "method", height=max(260, 60 * len(methods) + 160))


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
