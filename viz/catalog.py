"""Every view in one list: its name, the app tab it sits in, and how it renders from a set of lanes.

`render(traces, lane)` gets all lanes' traces and the index of the lane chosen for per-lane views; a per-lane
view falls back to the first lane it applies to. The app builds its tabs from this list and the CLI's
`figure` command exports any entry by name. A plugin adds its own with `register_view(View(...))`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

from explorer.trace import Trace
from viz.diffusion import (
    cache_drift_figure,
    unmasking_commits_figure,
    unmasking_order_figure,
    unmasking_replay_figure,
)
from viz.drafting import (
    aded_figure,
    draft_depth_figure,
    draft_vocabulary_figure,
    entropy_handover_figure,
    exit_layer_figure,
    layer_acceptance_figure,
    spectr_figure,
)
from viz.figures import (
    constraint_figure,
    divergence_figure,
    entropy_curves,
    mirostat_figure,
    top_h_figure,
    topk_heatmap,
)
from viz.search import (
    beam_tree_figure,
    cautious_figure,
    contrastive_figure,
    exact_extract_figure,
    first_finish_figure,
    instructive_figure,
    lattice_figure,
    mbr_figure,
    momentum_figure,
    repetition_figure,
    superposed_figure,
)
from viz.speculative import (
    acceptance_by_position_figure,
    acceptance_heatmap,
    accepted_length_histogram,
    draft_tree_figure,
    jacobi_graph_figure,
    jacobi_grid,
    layer_skip_figure,
    pool_figure,
    round_timeline,
    skip_set_figure,
    tree_size_figure,
)
from viz.whatif import attention_graph_figure, branch_tree_figure, divergence_why_figure, logit_lens_figure

# The strategies whose beam tree the app streams live while they run (app.py); the beam-tree view itself applies
# to any trace with beam steps.
BEAM_STRATEGIES = ("beam", "diverse_beam")


def pick(traces: Sequence[Trace | None], lane: int, wanted: Callable[[Trace], bool] = lambda t: True
         ) -> Trace | None:
    """The chosen lane if the view applies to it, else the first lane it applies to."""
    if 0 <= lane < len(traces) and traces[lane] is not None and wanted(traces[lane]):
        return traces[lane]
    return next((t for t in traces if t is not None and wanted(t)), None)


# Which per-lane view applies to a trace is decided by what the trace holds (the events or the recorded details
# its figure draws), never by the strategy's name: a renamed strategy, or a new one that records the same data,
# gets the view without a change here.
def _drafted(t: Trace) -> bool:
    """Our draft rounds, or an imported engine's record of them."""
    return bool(t.rounds) or (t.engine_record is not None and bool(t.engine_record.steps))


def _kinds(*kinds: str) -> Callable[[Trace], bool]:
    """Traces holding at least one event of every one of these kinds."""
    return lambda t: all(any(e.kind == kind for e in t.events) for kind in kinds)


def _round_detail(key: str) -> Callable[[Trace], bool]:
    """Traces with a draft round that recorded `key` in its details (an empty string records nothing)."""
    return lambda t: t.has_round_detail(key)


def _step_detail(key: str) -> Callable[[Trace], bool]:
    """Traces with a committed token that recorded `key` in its details."""
    return lambda t: t.has_step_detail(key)


def _candidates(feature_name: str) -> Callable[[Trace], bool]:
    """Traces with a re-ranked step (CandidateStep) whose penalty came from this feature."""
    return lambda t: any(e.kind == "candidate_step" and e.feature_name == feature_name for e in t.events)


@dataclass(frozen=True)
class View:
    """A view: `name` (unique: the CLI's `figure --view NAME`), the app `tab` it sits in (a new name opens a new
    tab), its `label`, and `render(traces, lane)`, all lanes' traces (None for an empty lane) and the index of the
    lane chosen for per-lane views, to a plotly figure. It must draw something for any traces: an empty figure
    with a note when none of them holds its data."""

    name: str
    tab: str
    label: str
    render: Callable[[Sequence[Trace | None], int], go.Figure]


def _chosen(traces: Sequence[Trace | None], lane: int) -> Trace | None:
    return traces[lane] if 0 <= lane < len(traces) else None


def _all(function: Callable[[Sequence[Trace]], go.Figure]) -> Callable[[Sequence[Trace | None], int], go.Figure]:
    return lambda traces, lane: function([t for t in traces if t is not None])


def _one(function: Callable[..., go.Figure], wanted: Callable[[Trace], bool]
         ) -> Callable[[Sequence[Trace | None], int], go.Figure]:
    """A per-lane view: the chosen lane (or the first it applies to), titled with that lane's own number."""
    def render(traces: Sequence[Trace | None], lane: int) -> go.Figure:
        trace = pick(traces, lane, wanted)
        return function(trace, lane=next((i for i, t in enumerate(traces) if t is trace), 0))

    return render


VIEWS = [
    View("heatmap", "Top-k & entropy", "per-step top-k",
         lambda traces, lane: topk_heatmap(_chosen(traces, lane), lane=lane)),
    View("entropy", "Top-k & entropy", "entropy and confidence", _all(entropy_curves)),
    View("divergence", "Top-k & entropy", "divergence from lane 1", _all(divergence_figure)),
    View("mirostat", "Sampling", "mirostat", _all(mirostat_figure)),
    View("top_h", "Sampling", "top-h", _all(top_h_figure)),
    View("acceptance", "Speculative", "acceptance per round", _one(acceptance_heatmap, _drafted)),
    View("timeline", "Speculative", "draft vs verify time", _one(round_timeline, _drafted)),
    View("accepted-lengths", "Speculative", "accepted lengths", _all(accepted_length_histogram)),
    View("by-position", "Speculative", "per-position acceptance", _all(acceptance_by_position_figure)),
    View("layer-skip", "Speculative", "layer skip", _all(layer_skip_figure)),
    View("skip-sets", "Speculative", "skipped layers per round",
         _one(skip_set_figure, _round_detail("skipped_layers"))),
    View("spectr", "Speculative", "SpecTr vs rejection sampling",
         _one(spectr_figure, _round_detail("kseq_root_accept"))),
    View("exit-layer", "Speculative", "DEL exit layer per round", _one(exit_layer_figure, _round_detail("exit_layer"))),
    View("layer-acceptance", "Speculative", "DEL per-layer acceptance",
         _one(layer_acceptance_figure, _round_detail("layer_acceptance"))),
    View("draft-depth", "Speculative", "D^3 layers per draft token",
         _one(draft_depth_figure, _round_detail("draft_depths"))),
    View("draft-vocabulary", "Speculative", "draft-vocabulary coverage (eagle)",
         _one(draft_vocabulary_figure, _round_detail("target_in_vocab"))),
    View("entropy-handover", "Speculative", "EAD: who wrote each token", _one(entropy_handover_figure,
                                                                             _step_detail("rolling_entropy"))),
    View("draft-tree", "Trees & Jacobi", "draft tree per round (slider)", _one(draft_tree_figure, _drafted)),
    View("tree-size", "Trees & Jacobi", "tree size vs accepted length", _all(tree_size_figure)),
    View("aded", "Trees & Jacobi", "ADED acceptance and matrix growth",
         _one(aded_figure, _round_detail("matrix_rows"))),
    View("pool", "Trees & Jacobi", "n-gram pool / adjacency graph", _one(pool_figure, _kinds("pool_update"))),
    View("jacobi-grid", "Trees & Jacobi", "iteration x position", _one(jacobi_grid, _round_detail("iteration"))),
    View("jacobi-graph", "Trees & Jacobi", "convergence dependencies",
         _one(jacobi_graph_figure, _round_detail("iteration"))),
    View("beam-tree", "Search", "beam tree", _one(beam_tree_figure, _kinds("beam_step"))),
    View("contrastive", "Search", "contrastive candidates",
         _one(contrastive_figure, _candidates("max cosine similarity"))),
    View("momentum", "Search", "momentum graph", _one(momentum_figure, _candidates("loop length"))),
    View("cautious", "Search", "cautious trials", _one(cautious_figure, _kinds("trial_branch"))),
    View("mbr", "Search", "MBR utility matrix", _one(mbr_figure, _kinds("mbr_result"))),
    View("first-finish", "Search", "first-finish race", _one(first_finish_figure, _kinds("finish_race"))),
    View("lattice", "Search", "lattice (merges, distinct paths)", _one(lattice_figure, _kinds("lattice_result"))),
    View("superposed", "Search", "superposed drafts and candidates",
         _one(superposed_figure, _kinds("superposed_step", "superposed_result"))),
    View("exact-extract", "Search", "span probabilities", _one(exact_extract_figure, _kinds("extract_spans"))),
    View("constraint", "Sampling", "constraint checks and weights", _one(constraint_figure,
                                                                           _step_detail("evaluations"))),
    View("repetition", "Sampling", "repetition", _all(repetition_figure)),
    View("instructive", "Sampling", "instructive decoding: flipped tokens",
         _one(instructive_figure, _step_detail("flipped"))),
    View("logit-lens", "What if", "logit lens (layer x step)", _one(logit_lens_figure, _kinds("lens_step"))),
    View("attention-graph", "What if", "attention dependencies", _one(attention_graph_figure,
                                                                    _kinds("attention_step"))),
    View("branch-tree", "What if", "branch tree", _all(branch_tree_figure)),
    View("why-parted", "What if", "why lanes parted", lambda traces, lane: divergence_why_figure(
        [t for t in traces if t is not None], lane)),
    View("unmasking-order", "Diffusion", "unmasking order (step x position)",
         _one(unmasking_order_figure, _kinds("unmask_step"))),
    View("unmasking-replay", "Diffusion", "canvas replay (slider)", _one(unmasking_replay_figure,
                                                                        _kinds("unmask_step"))),
    View("unmasking-commits", "Diffusion", "tokens per step, confidence at commit", _all(unmasking_commits_figure)),
    View("cache-drift", "Diffusion", "cache drift (cached vs full pass)", _one(cache_drift_figure,
                                                                             _kinds("cache_drift"))),
]
VIEW_NAMES = [view.name for view in VIEWS]


def register_view(view: View) -> View:
    """Add a view to the catalog (a plugin's: explorer/plugins.py), after the built-in ones: the app shows it in its
    tab, the CLI's `figure --view` and the paper export take it. Register before the app builds its page (a plugin
    does so when it is loaded, at start)."""
    if not isinstance(view, View):
        raise ValueError(f"register_view takes a View(name, tab, label, render), got {type(view).__name__}")
    if view.name in VIEW_NAMES:
        raise ValueError(f"view {view.name!r} is already registered: give this one another name")
    VIEWS.append(view)
    VIEW_NAMES.append(view.name)
    return view


def unregister_view(name: str) -> None:
    """Remove a registered view (a plugin that failed half-way, a test's plugin)."""
    index = VIEW_NAMES.index(name)
    del VIEWS[index], VIEW_NAMES[index]


def get_view(name: str) -> View:
    for view in VIEWS:
        if view.name == name:
            return view
    raise ValueError(f"unknown view {name!r}: choose one of {', '.join(VIEW_NAMES)}")


def render_all(traces: Sequence[Trace | None], lane: int = 0) -> list[go.Figure]:
    return [view.render(traces, lane) for view in VIEWS]
