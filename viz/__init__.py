"""Pure views: Trace -> plotly Figure (or HTML). Nothing here runs a model or imports gradio."""

from viz.figures import (
    divergence_figure,
    entropy_curves,
    first_divergence,
    mirostat_figure,
    top_h_figure,
    topk_heatmap,
)
from viz.search import (
    beam_tree,
    beam_tree_figure,
    cautious_figure,
    contrastive_figure,
    momentum_figure,
    momentum_graph,
    repetition_figure,
)
from viz.speculative import (
    acceptance_by_position_figure,
    acceptance_heatmap,
    accepted_length_histogram,
    jacobi_dependency_graph,
    jacobi_graph_figure,
    jacobi_grid,
    layer_skip_figure,
    round_timeline,
    skip_set_figure,
)
from viz.tokens import metrics_html, tokens_html

__all__ = ["acceptance_by_position_figure", "acceptance_heatmap", "accepted_length_histogram", "beam_tree",
    "beam_tree_figure", "cautious_figure", "contrastive_figure", "divergence_figure", "entropy_curves",
    "first_divergence", "jacobi_dependency_graph", "jacobi_graph_figure", "jacobi_grid", "layer_skip_figure",
    "metrics_html", "mirostat_figure", "momentum_figure", "momentum_graph", "repetition_figure", "round_timeline",
    "skip_set_figure", "tokens_html", "top_h_figure", "topk_heatmap"]
