"""Pure views: Trace -> plotly Figure (or HTML). Nothing here runs a model or imports gradio."""

from viz.figures import (
    divergence_figure,
    entropy_curves,
    first_divergence,
    mirostat_figure,
    top_h_figure,
    topk_heatmap,
)
from viz.tokens import metrics_html, tokens_html

__all__ = ["divergence_figure", "entropy_curves", "first_divergence", "metrics_html", "mirostat_figure",
           "top_h_figure", "tokens_html", "topk_heatmap"]
