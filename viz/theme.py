"""Colours, fonts and figure defaults in one place: colour-blind safe (Okabe-Ito), readable in grayscale."""

from __future__ import annotations

import math

import plotly.graph_objects as go

# Okabe & Ito (2008) qualitative palette, ordered so that neighbours differ in lightness too.
LANE_COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
LANE_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot", "solid", "dash"]
# Cividis is perceptually uniform, colour-blind safe and monotone in lightness (prints in grayscale).
SEQUENTIAL = "Cividis"
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=13)
SAME, DIFFERENT, FIRST_DIVERGENCE = "#BBBBBB", "#E69F00", "#D55E00"


def lane_color(index: int) -> str:
    return LANE_COLORS[index % len(LANE_COLORS)]


def lane_dash(index: int) -> str:
    return LANE_DASHES[index % len(LANE_DASHES)]


def sequential_rgb(value: float) -> tuple[int, int, int]:
    """Cividis at `value` in [0, 1] as an RGB triple (linear interpolation between anchor colours)."""
    anchors = [(0.0, (0, 34, 78)), (0.25, (61, 78, 110)), (0.5, (124, 123, 120)), (0.75, (188, 175, 111)),
               (1.0, (254, 232, 56))]
    value = min(max(value, 0.0), 1.0)
    for (x0, c0), (x1, c1) in zip(anchors, anchors[1:], strict=False):
        if value <= x1:
            t = (value - x0) / (x1 - x0)
            return tuple(round(a + t * (b - a)) for a, b in zip(c0, c1, strict=True))  # type: ignore[return-value]
    return anchors[-1][1]


def readable_text_color(rgb: tuple[int, int, int]) -> str:
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#000000" if luminance > 140 else "#FFFFFF"


# Axes that count things (steps, ranks, positions): ticks at whole numbers only, never at 0.5.
INTEGER_AXES = {"step", "rank", "round", "draft position", "accepted tokens", "position", "iteration", "depth",
                "n-gram", "converged at iteration", "tokens", "rounds", "layer"}


def _integer_dtick(values: list[float]) -> int:
    span = max(values) - min(values) if values else 1
    raw = max(1.0, span / 8)
    scale = 10 ** math.floor(math.log10(raw))
    return int(next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw))


def integer_ticks(figure: go.Figure, axis: str) -> None:
    """Whole-number ticks on `axis` ("x" or "y"), spaced for the data's range."""
    values = [float(v) for trace in figure.data for v in (getattr(trace, axis, None) or ())
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    update = figure.update_xaxes if axis == "x" else figure.update_yaxes
    update(tick0=0, dtick=_integer_dtick(values), tickformat="d")


def base_layout(figure: go.Figure, title: str, x_title: str, y_title: str, height: int = 360) -> go.Figure:
    figure.update_layout(
        title=dict(text=title, x=0.01, automargin=True), font=FONT, template="plotly_white", height=height,
        margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.2), hovermode="closest",
    )
    figure.update_xaxes(title_text=x_title, automargin=True)
    figure.update_yaxes(title_text=y_title, automargin=True)
    for axis, axis_title in (("x", x_title), ("y", y_title)):
        if axis_title in INTEGER_AXES and figure.layout[f"{axis}axis"].type not in ("category", "log"):
            integer_ticks(figure, axis)
    return figure


def legend_keys(figure: go.Figure, entries: list[tuple[str, str, str]]) -> int:
    """Legend-only entries (name, colour, marker symbol) for colours that the data traces do not name
    themselves; returns how many were added (they come last)."""
    for name, color, symbol in entries:
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, showlegend=True,
                                    marker=dict(color=color, symbol=symbol, size=11), hoverinfo="skip"))
    return len(entries)


def empty_figure(message: str) -> go.Figure:
    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                          font=dict(size=14, color="#666666"))
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(template="plotly_white", height=220, font=FONT, meta={"empty": True})
    return figure


def has_data(figure: go.Figure) -> bool:
    """False for the placeholder `empty_figure` draws where a view has nothing to show."""
    meta = figure.layout.meta
    return not (isinstance(meta, dict) and meta.get("empty"))
