"""Colours, fonts and figure defaults in one place: colour-blind safe (Okabe-Ito), readable in grayscale."""

from __future__ import annotations

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


def base_layout(figure: go.Figure, title: str, x_title: str, y_title: str, height: int = 360) -> go.Figure:
    figure.update_layout(
        title=dict(text=title, x=0.01), font=FONT, template="plotly_white", height=height,
        margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.2), hovermode="closest",
    )
    figure.update_xaxes(title_text=x_title)
    figure.update_yaxes(title_text=y_title)
    return figure


def empty_figure(message: str) -> go.Figure:
    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                          font=dict(size=14, color="#666666"))
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(template="plotly_white", height=220, font=FONT)
    return figure
