"""Figures across many runs (a sweep), drawn from the tables of explorer.metrics: speedup per method and prompt
category, SPEED-Bench's acceptance matrix, and a quality map."""

from __future__ import annotations

import math
import re
from collections.abc import Collection

import plotly.graph_objects as go

from explorer.metrics import AcceptanceMatrix, QualityTable, SamplingTable, SpeedTable
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


QUALITY_LABELS = {"coherence": "coherence (cosine, prompt vs continuation)", "diversity": "diversity (Π (1 − rep-n))",
                  "distinct_2": "distinct-2", "mauve": "MAUVE", "ngram_entropy": "Ent-4 (nats)",
                  "tokens_per_s": "tokens / s", "passes_per_token": "target forward passes / token"}


def _mean(value: object) -> float:
    if isinstance(value, tuple):
        return value[0]
    return value if isinstance(value, (int, float)) else math.nan


def _half(value: object) -> float:
    return (value[2] - value[1]) / 2 if isinstance(value, tuple) else 0.0


def pareto_front(points: list[tuple[float, float]], maximize_x: bool = True) -> list[int]:
    """Indices of the points no other point beats on both axes (y is maximised; x maximised or minimised)."""
    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        better_x = a[0] >= b[0] if maximize_x else a[0] <= b[0]
        strictly = (a[0] > b[0] if maximize_x else a[0] < b[0]) or a[1] > b[1]
        return better_x and a[1] >= b[1] and strictly

    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    return [i for i in finite if not any(beats(points[j], points[i]) for j in finite if j != i)]


def quality_speed_figure(table: QualityTable, quality: str = "coherence", speed: str = "tokens_per_s") -> go.Figure:
    """Every method at (speed, quality) with its 95 % intervals; the Pareto front (no method both faster and
    better) joined and marked. `speed` = tokens_per_s (higher is better) or passes_per_token (lower is better)."""
    methods = [m for m, row in table.items() if math.isfinite(_mean(row.get(quality)))
               and math.isfinite(_mean(row.get(speed)))]
    if not methods:
        return empty_figure(f"No finished runs with {quality} and {speed}.")
    points = [(_mean(table[m][speed]), _mean(table[m][quality])) for m in methods]
    front = set(pareto_front(points, maximize_x=speed != "passes_per_token"))
    figure = go.Figure()
    for index, method in enumerate(methods):
        row = table[method]
        labelled = index in front or len(methods) <= 8  # many labels would overlap: the legend names them all
        figure.add_trace(go.Scatter(
            x=[points[index][0]], y=[points[index][1]], mode="markers+text" if labelled else "markers",
            name=method, text=[method if labelled else ""], textposition="top center",
            error_x=dict(type="data", array=[_half(row[speed])], visible=True, thickness=1, width=2),
            error_y=dict(type="data", array=[_half(row[quality])], visible=True, thickness=1, width=2),
            marker=dict(size=12 if index in front else 8, color=lane_color(index), line=dict(width=2 if index in
                        front else 0, color="#000000"), symbol=["circle", "square", "diamond", "triangle-up", "x",
                                                                "cross", "star", "hexagon"][index % 8]),
            hovertemplate=f"{method}<br>{speed} %{{x:.3g}}<br>{quality} %{{y:.3g}}"
                          + (" (Pareto front)" if index in front else "") + "<extra></extra>"))
    ordered = sorted(front, key=lambda i: points[i][0])
    figure.add_trace(go.Scatter(x=[points[i][0] for i in ordered], y=[points[i][1] for i in ordered],
                                mode="lines", name="Pareto front", line=dict(color="#000000", dash="dot")))
    return base_layout(figure, f"{QUALITY_LABELS.get(quality, quality)} vs {QUALITY_LABELS.get(speed, speed)}",
                       QUALITY_LABELS.get(speed, speed), QUALITY_LABELS.get(quality, quality))


def _without_temperature(method: str) -> str:
    """A configuration's label without its temperature: 'sample(temperature=0.7,top_p=0.9)' -> 'sample(top_p=0.9)'
    (the configurations a temperature sweep joins into one line)."""
    label = re.sub(r"temperature=[^,)]*,?", "", method)
    return label.replace(",)", ")").replace("()", "")


def diversity_quality_figure(table: QualityTable, quality: str = "coherence", diversity: str = "diversity",
                             strategies: Collection[str] | None = None) -> go.Figure:
    """The samplers' trade-off as their papers draw it (Top-H, min-p, Mirostat): for each sampling strategy, its
    configurations ordered by temperature at (diversity, quality), joined (the marker grows with the temperature;
    each point labelled T = ... where few lines are drawn). `strategies`: only these (e.g. the sampling family)."""
    by_strategy: dict[str, list[str]] = {}
    for method, row in table.items():
        if (row.get("temperature") is not None and (strategies is None or row.get("strategy") in strategies)
                and math.isfinite(_mean(row.get(quality))) and math.isfinite(_mean(row.get(diversity)))):
            by_strategy.setdefault(_without_temperature(method), []).append(method)
    if not by_strategy:
        return empty_figure("No sampling runs with a temperature: sweep samplers at several temperatures.")
    figure = go.Figure()
    for index, (strategy, methods) in enumerate(sorted(by_strategy.items())):
        methods.sort(key=lambda m: float(table[m]["temperature"]))
        labelled = len(by_strategy) <= 3  # more lines: the marker size says the temperature (hover names it)
        temperatures = [float(table[m]["temperature"]) for m in methods]
        figure.add_trace(go.Scatter(
            x=[_mean(table[m][diversity]) for m in methods], y=[_mean(table[m][quality]) for m in methods],
            error_x=dict(type="data", array=[_half(table[m][diversity]) for m in methods], visible=True,
                         thickness=1, width=2),
            error_y=dict(type="data", array=[_half(table[m][quality]) for m in methods], visible=True,
                         thickness=1, width=2),
            text=[f"T={table[m]['temperature']}" for m in methods], textposition="top center",
            marker=dict(size=[6 + 6 * (t - min(temperatures)) / max(1e-9, max(temperatures) - min(temperatures))
                              for t in temperatures]),
            mode="lines+markers+text" if labelled else "lines+markers", name=strategy,
            line=dict(color=lane_color(index), dash=lane_dash(index)),
            hovertemplate=f"{strategy} %{{text}}<br>{diversity} %{{x:.3f}}<br>{quality} %{{y:.3f}}<extra></extra>"))
    figure.update_layout(legend_title_text="marker size: temperature")
    return base_layout(figure, "Diversity vs quality across temperatures", QUALITY_LABELS.get(diversity, diversity),
                       QUALITY_LABELS.get(quality, quality))
