"""Figures for papers: a serif theme at one- or two-column width, saved as SVG, PDF or PNG via kaleido.

The palette is the app's (Okabe-Ito lanes, Cividis scales), which stays distinguishable in grayscale."""

from __future__ import annotations

import copy
import textwrap
import threading
import warnings
from pathlib import Path

import plotly.graph_objects as go

WIDTHS_IN = {"one": 3.5, "two": 7.16}  # column widths of common two-column venues, in inches
FORMATS = ("svg", "pdf", "png")
PX_PER_IN = 96
PNG_SCALE = 3  # ~300 dpi
PAPER_FONT = dict(family="Times New Roman, Times, serif", size=9, color="#000000")
_SERVER_LOCK = threading.Lock()
_SERVER_STARTED = False


def paper_figure(figure: go.Figure, width: str = "one", aspect: float = 0.68) -> go.Figure:
    """A copy of `figure` restyled for print: serif 9 pt, white, compact margins, sized to a column."""
    if width not in WIDTHS_IN:
        raise ValueError(f"width must be one of {', '.join(WIDTHS_IN)} (column widths)")
    paper = go.Figure(copy.deepcopy(figure))
    px = int(WIDTHS_IN[width] * PX_PER_IN)
    title = paper.layout.title.text or ""
    # Titles wrap to the column (about 5.5 px a character at 10 pt) instead of running off the page.
    paper.layout.title.text = "<br>".join(textwrap.wrap(title.replace("<br>", " "), int((px - 20) / 5.5)))
    paper.update_layout(
        template="simple_white", font=PAPER_FONT, width=px, height=int(px * aspect),
        margin=dict(l=52, r=12, t=int(px * aspect * 0.22) + 20, b=44),
        title=dict(font=dict(size=10), x=0, xanchor="left", y=1, yanchor="top", pad=dict(t=8), xref="paper",
                   yref="container", automargin=False),
        # The legend sits above the plot area, under the title, never on the data or the x-axis title.
        legend=dict(font=dict(size=8), orientation="h", x=0, xanchor="left", y=1.02, yanchor="bottom"),
    )
    paper.update_xaxes(automargin=True, title_standoff=4)
    paper.update_yaxes(automargin=True, title_standoff=4)
    paper.update_annotations(font=dict(family=PAPER_FONT["family"], size=8))
    return paper


def _ensure_server() -> None:
    global _SERVER_STARTED
    with _SERVER_LOCK:
        if not _SERVER_STARTED:
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)  # one browser for all exports: fast
            _SERVER_STARTED = True


def save_figure(figure: go.Figure, path: str | Path, width: str = "one") -> Path:
    """Write the figure in the paper theme; the format is the file's suffix (svg, pdf or png)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"cannot export {path.name}: use a .svg, .pdf or .png file name")
    paper = paper_figure(figure, width)
    try:
        _ensure_server()
        with warnings.catch_warnings():  # plotly warns that the shared server ignores per-call options
            warnings.simplefilter("ignore", UserWarning)
            paper.write_image(str(path), format=fmt, scale=PNG_SCALE if fmt == "png" else 1)
    except Exception as error:  # kaleido needs a Chrome/Chromium browser on the machine
        raise ValueError(f"figure export failed ({type(error).__name__}: {error}); it needs Chromium "
                         "(Debian: apt-get install chromium)") from error
    return path
