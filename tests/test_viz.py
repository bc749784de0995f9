"""Every view builds from fixture traces; divergence is computed right; model output is escaped."""

import math

import plotly.graph_objects as go
import pytest

from explorer.events import RunFinished, TokenStep
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.trace import Trace
from viz import (
    divergence_figure,
    entropy_curves,
    first_divergence,
    metrics_html,
    mirostat_figure,
    tokens_html,
    top_h_figure,
    topk_heatmap,
)

HOSTILE = ['<script>alert("x")</script>', '<img src=x onerror="window.__xss=1">', "\"quoted\" & 'single'", "\n"]


@pytest.fixture(scope="module")
def lanes(tiny_flat):
    runs = [("greedy", {}), ("sample", {"top_p": 0.9}), ("mirostat", {"tau": 4.0}), ("top_h", {"alpha": 0.5})]
    return [run_to_end(tiny_flat, RunRequest.build(name, params, "Hello", max_new_tokens=15, seed=3))
            for name, params in runs]


def hostile_trace(base: Trace) -> Trace:
    trace = Trace(base.started)
    for index, text in enumerate(HOSTILE):
        trace.add(TokenStep(step=index, position=10 + index, token_id=index, token_text=text, logprob=-0.5, rank=0,
                            entropy=1.0, top_ids=[index, 99], top_logprobs=[-0.5, -1.0], top_texts=[text, "<b>"],
                            kept_top_ids=[index], kept_top_logprobs=[0.0], kept_count=1, kept_logprob=0.0))
    trace.add(RunFinished(status="failed", stop_reason="error", error="<script>bad()</script>", text="".join(HOSTILE),
                          new_tokens=4, wall_time_s=1.0, prefill_time_s=0.1, target_forward_passes=4))
    return trace


def test_every_view_builds(lanes):
    figures = [topk_heatmap(lanes[0]), entropy_curves(lanes), divergence_figure(lanes), mirostat_figure(lanes),
               top_h_figure(lanes)]
    for figure in figures:
        assert isinstance(figure, go.Figure) and len(figure.data) > 0
        assert figure.layout.title.text
    heat = figures[0].data[0]
    assert len(heat.x) == 15 and heat.zmax == 1
    assert figures[0].layout.xaxis.title.text == "step" and figures[0].layout.yaxis.title.text == "rank"


def test_views_have_empty_states():
    for figure in [topk_heatmap(None), entropy_curves([]), divergence_figure([]), mirostat_figure([]),
                   top_h_figure([])]:
        assert figure.layout.annotations[0].text


def test_first_divergence_and_margin(lanes):
    greedy, sampled = lanes[0], lanes[1]
    found = first_divergence(greedy, sampled)
    index = next(i for i, (a, b) in enumerate(zip(greedy.token_ids, sampled.token_ids, strict=False)) if a != b)
    assert found.step == index
    ref = greedy.token_steps[index]
    other = sampled.token_steps[index].token_id
    if other in ref.top_ids:
        expected = math.exp(ref.logprob) - math.exp(ref.top_logprobs[ref.top_ids.index(other)])
        assert found.margin == pytest.approx(expected)
        assert found.margin >= 0  # greedy's token is the argmax
    assert first_divergence(greedy, greedy) is None


def test_tokens_html_escapes_model_output(lanes):
    page = tokens_html(hostile_trace(lanes[0]))
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "<script" not in metrics_html(hostile_trace(lanes[0]))
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in page
    assert "&#x27;single&#x27;" in page


def test_tokens_html_colour_modes(lanes):
    by_p = tokens_html(lanes[1], "probability")
    by_h = tokens_html(lanes[1], "entropy")
    assert by_p.count('class="tok"') == 15 and by_p != by_h
    with pytest.raises(ValueError, match="color_by"):
        tokens_html(lanes[1], "rainbow")


def test_metrics_html_speedup(lanes, drafted):
    html = metrics_html(lanes[1], baseline=lanes[0])
    assert "speedup" not in html and "tokens/s" in html and lanes[1].run_id in html  # sampling: not a speed-up
    lossless = metrics_html(drafted[1], baseline=drafted[0])  # greedy-rule prompt lookup against greedy
    assert "speedup vs greedy" in lossless


# ----------------------------------------------------------------------------------- draft-verify views
from viz import (  # noqa: E402
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
from viz.speculative import jacobi_cells  # noqa: E402


@pytest.fixture(scope="module")
def drafted(tiny):
    runs = [("greedy", {}), ("prompt_lookup", {"min_ngram": 1}), ("jacobi", {"window": 5}),
            ("self_speculative", {"skip": "1"}), ("speculative", {"draft_length": 3, "draft_model": "target"})]
    return [run_to_end(tiny, RunRequest.build(name, params, "ab ab ab ab ab ab", max_new_tokens=30, chat=False))
            for name, params in runs]


def test_speculative_views_build(drafted):
    for figure in [acceptance_heatmap(drafted[1]), round_timeline(drafted[4]), accepted_length_histogram(drafted),
                   acceptance_by_position_figure(drafted), layer_skip_figure(drafted), jacobi_grid(drafted[2]),
                   jacobi_graph_figure(drafted[2]), skip_set_figure(drafted[3])]:
        assert isinstance(figure, go.Figure) and len(figure.data) > 0 and figure.layout.title.text
    heat = acceptance_heatmap(drafted[4]).data[0]
    assert len(heat.y) == len(drafted[4].rounds)
    # the speculative lane drafts with the target itself: every reached cell is accepted
    assert all(v in (1.0, None) for row in heat.z for v in row)
    assert acceptance_heatmap(drafted[0]).layout.annotations  # greedy has no rounds: an empty state
    skipped = skip_set_figure(drafted[3]).data[1]  # skip "1": layer 1 dark in every round, layer 0 never
    assert all(v == 1.0 for v in skipped.z[1]) and all(v == 0.0 for v in skipped.z[0])
    assert skip_set_figure(drafted[0]).layout.annotations


def test_jacobi_convergence_is_consistent(drafted):
    trace = drafted[2]
    cells, converged = jacobi_cells(trace)
    committed = {s.position for s in trace.token_steps}
    assert set(converged) == committed
    commit_round = {}
    for round_ in trace.rounds:
        for offset in range(round_.accepted_count + 1):  # the bonus is the guess of the next iteration
            commit_round.setdefault(round_.position + offset, round_.round + (offset == round_.accepted_count))
    assert all(converged[p] <= commit_round[p] for p in converged)
    texts = {s.position: s.token_text for s in trace.token_steps}
    at = {(c.iteration, c.position): c for c in cells}
    for position, iteration in converged.items():  # every diamond sits on the committed token
        assert at[iteration, position].token_text == texts[position] and at[iteration, position].final
    graph = jacobi_dependency_graph(trace)
    assert graph.number_of_nodes() == len(committed) and graph.number_of_edges() == len(committed) - 1
    assert all(converged[b] >= converged[a] for a, b in graph.edges)  # causal: never before its predecessor


def test_origin_colouring_and_round_hover(drafted):
    page = tokens_html(drafted[1], "origin")
    assert "accepted draft token" in page or "target&#x27;s token after a round" in page
    assert "round 0: draft" in page
    assert "mean accepted" in metrics_html(drafted[1])


# --------------------------------------------------------------------------------------- search views
from viz import (  # noqa: E402
    beam_tree,
    beam_tree_figure,
    cautious_figure,
    contrastive_figure,
    momentum_figure,
    momentum_graph,
    repetition_figure,
)
from viz.search import tree_layout  # noqa: E402


@pytest.fixture(scope="module")
def searched(tiny_flat):
    runs = [("beam", {"num_beams": 3, "num_return": 3}), ("diverse_beam", {"num_beams": 4, "groups": 2}),
            ("contrastive", {}), ("momentum", {"alpha": 2.0}),
            ("cautious", {"h_min": 0.1, "h_max": 1.0, "max_trial_tokens": 8})]
    return [run_to_end(tiny_flat, RunRequest.build(name, params, "Hello", max_new_tokens=12, seed=1))
            for name, params in runs]


def test_search_views_build(searched):
    for figure in [beam_tree_figure(searched[0]), beam_tree_figure(searched[1]), contrastive_figure(searched[2]),
                   momentum_figure(searched[3]), cautious_figure(searched[4]), repetition_figure(searched)]:
        assert isinstance(figure, go.Figure) and len(figure.data) > 0 and figure.layout.title.text
    assert beam_tree_figure(searched[2]).layout.annotations  # not a beam run: empty state


def test_beam_tree_marks_the_n_best_paths_and_lays_out_deterministically(searched):
    graph = beam_tree(searched[0])
    best = [n for n, d in graph.nodes(data=True) if d["best"]]
    assert "root" in best and len([n for n in best if graph.out_degree(n) == 0]) == 3  # three n-best leaves
    assert tree_layout(graph) == tree_layout(beam_tree(searched[0]))
    assert all(graph.in_degree(n) == 1 for n in graph.nodes if n != "root")  # a tree


def test_momentum_graph_marks_revisits(searched):
    graph = momentum_graph(searched[3])
    assert graph.number_of_nodes() > 0
    revisits = [d for _, _, d in graph.edges(data=True) if d.get("revisit")]
    assert all(d["count"] >= 1 for d in revisits)


def test_repetition_rate():
    from explorer.trace import Trace

    trace = Trace(searched_started())
    for i, token in enumerate([1, 2, 1, 2, 1, 2]):
        trace.add(TokenStep(step=i, position=i, token_id=token, token_text=str(token), logprob=-1.0, rank=0,
                            entropy=1.0, top_ids=[token], top_logprobs=[-1.0], top_texts=[str(token)],
                            kept_top_ids=[token], kept_top_logprobs=[-1.0], kept_count=1, kept_logprob=-1.0))
    assert trace.repetition_rate(2) == pytest.approx(1 - 2 / 5)  # (1,2) and (2,1) only
    assert trace.repetition_rate(6) == 0.0


def searched_started():
    from explorer.events import RunStarted

    return RunStarted(run_id="r", strategy="greedy", config={}, model_id="m", weights_hash="", dtype="float32",
                      device="cpu", seed=0, versions={}, prompt="p", chat=False, system_prompt=None, prompt_ids=[0],
                      max_new_tokens=6, stop_strings=[], created_at="2026-01-01T00:00:00")


def test_lane_names_show_only_changed_parameters(tiny):
    from viz.labels import lane_name

    tree = run_to_end(tiny, RunRequest.build("tree_speculative", {}, "Hi", max_new_tokens=4))
    assert lane_name(tree, 1) == "2: tree_speculative"
    changed = run_to_end(tiny, RunRequest.build("tree_speculative", {"depth": 2, "rule": "sampling"}, "Hi",
                                                max_new_tokens=4))
    assert lane_name(changed, 0) == "1: tree_speculative (rule=sampling, depth=2)"


def test_colour_keys_and_whole_number_ticks(lanes, drafted):
    from viz.tokens import color_legend_html

    assert "accepted draft token" in color_legend_html("origin") and "linear-gradient" in color_legend_html("entropy")
    divergence = divergence_figure(lanes)
    assert [t.name for t in divergence.data if t.showlegend] == ["same token as lane 1", "another token",
                                                                 "first divergence"]
    for figure in (topk_heatmap(lanes[0]), acceptance_heatmap(drafted[1]), divergence):
        assert figure.layout.xaxis.dtick >= 1 and figure.layout.xaxis.dtick == int(figure.layout.xaxis.dtick)


def test_vertical_axis_titles_fit_their_plots(lanes, drafted, tiny):
    """A y-axis title runs along the plot's height: a long one is clipped and runs into the figure's title."""
    from viz.catalog import VIEWS

    contrastive = run_to_end(tiny, RunRequest.build("contrastive", {}, "Hello", max_new_tokens=6))
    for traces in (lanes, drafted, [contrastive]):
        for view in VIEWS:
            figure = view.render(traces, 0)
            for name in ("yaxis", "yaxis2", "yaxis3"):
                axis = figure.layout[name] if name in figure.layout else None
                title = axis.title.text if axis is not None and axis.title else None
                assert not title or len(title) <= 28, (view.name, title)


def test_a_diffusion_lane_on_an_autoregressive_model_says_so():
    """The sampler on a causal LM reads the canvas left to right, one token per step: the lane says that this is
    not the method's behaviour; on a diffusion LM (a masked LM) it says nothing."""
    from explorer.events import CANVAS_AUTOREGRESSIVE, CANVAS_DIFFUSION
    from explorer.testing import tiny_masked_lm, tiny_model

    request = RunRequest.build("diffusion", {"block_length": 4}, "Hello", max_new_tokens=8)
    causal = run_to_end(tiny_model(0), request)
    masked = run_to_end(tiny_masked_lm(0), request)
    assert causal.started.tags["canvas"] == CANVAS_AUTOREGRESSIVE and masked.started.tags["canvas"] == CANVAS_DIFFUSION
    assert "an autoregressive model read as a canvas: expect one token per step" in metrics_html(causal)
    assert "read as a canvas" not in metrics_html(masked)
    greedy = run_to_end(tiny_model(0), RunRequest.build("greedy", {}, "Hello", max_new_tokens=4))
    assert "canvas" not in greedy.started.tags and "read as a canvas" not in metrics_html(greedy)
