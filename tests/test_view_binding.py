"""Per-lane views apply to a lane by the data their figure draws, not by the strategy's name (viz/catalog.py): each
view picks the lane of the strategy that records that data, still picks it once the strategy is renamed, and never
picks a greedy lane."""

import dataclasses

import pytest

from explorer.ngram import NgramModel
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.testing import tiny_model
from explorer.trace import Trace
from viz.catalog import get_view
from viz.theme import has_data

PROMPT = "the cat sat on the mat. the cat"

# view -> (strategy, params, model, max_new_tokens). Models: "sharp" / "flat" are the conftest fixtures `tiny` /
# `tiny_flat`; "deep" has the layers that layer skipping, early exits and a layer-skip small model need; "eagle" is
# "deep"'s shallow sibling with a briefly trained EAGLE head (the drafter's path is filled in by the fixture).
CASES = {
    "skip-sets": ("self_speculative", {"auto_skip": 2}, "deep", 8),
    "spectr": ("spectr", {"rule": "sampling", "drafts": 2}, "flat", 8),
    "exit-layer": ("del", {"confidence": 0.0}, "deep", 8),
    "layer-acceptance": ("del", {"confidence": 0.0}, "deep", 8),
    "draft-depth": ("depth_decay", {"draft_length": 3}, "deep", 8),
    "draft-vocabulary": ("eagle", {}, "eagle", 8),
    "entropy-handover": ("ead", {"window": 2, "min_run": 1}, "deep", 6),
    "aded": ("aded", {"simulations": 8}, "sharp", 8),
    "jacobi-grid": ("jacobi", {"window": 4}, "sharp", 8),
    "jacobi-graph": ("jacobi", {"window": 4}, "sharp", 8),
    "beam-tree": ("beam", {"num_beams": 2}, "sharp", 4),
    "beam-tree (diverse)": ("diverse_beam", {"num_beams": 4, "groups": 2}, "sharp", 4),
    "contrastive": ("contrastive", {"top_k": 4}, "sharp", 4),
    "momentum": ("momentum", {"top_k": 4}, "sharp", 4),
    "cautious": ("cautious", {"h_min": 0.1, "h_max": 1.0, "n_max": 2, "max_trial_tokens": 3}, "flat", 4),
    "mbr": ("mbr", {"samples": 3}, "flat", 4),
    "first-finish": ("first_finish", {"samples": 3}, "flat", 4),
    "lattice": ("lattice", {"expansions": 8, "ngram": 1}, "flat", 4),
    "superposed": ("superposed", {"drafts": 2}, "flat", 3),
    "exact-extract": ("exact_extract", {"max_span": 2}, "sharp", 4),
    "constraint": ("constrained", {"pattern": "(cat|dog)s? [a-z]{2,6}"}, "flat", 6),
    "instructive": ("instructive", {"epsilon": 1.0}, "sharp", 4),
}
# Views over all lanes that draw every lane holding their data (their figures once tested the strategy's name).
ALL_LANE_CASES = {
    "mirostat": ("mirostat", {}, "flat", 6),
    "top_h": ("top_h", {}, "flat", 6),
    "layer-skip": ("self_speculative", {"auto_skip": 2}, "deep", 8),
}


def _view(case: str) -> str:
    return case.split(" ")[0]


@pytest.fixture(scope="module")
def run(tiny, tiny_flat, tmp_path_factory):
    """The trace of a case's strategy (each strategy and parameter set run once for the module)."""
    models = {"sharp": tiny, "flat": tiny_flat}
    done: dict[tuple, Trace] = {}

    def model(name: str):
        if name not in models:
            if name == "deep":
                models[name] = tiny_model(0, scale=8.0, layers=6)
            elif name == "eagle":
                from explorer.train_drafter import train

                lm = tiny_model(0, scale=8.0)
                head = tmp_path_factory.mktemp("eagle-head")
                train(lm, head, corpus_tokens=400, steps=2, vocab=32, save_every=2, progress=False)
                models[name], models["eagle-head"] = lm, str(head)
        return models[name]

    def trace_of(strategy: str, params: dict, model_name: str, max_new_tokens: int) -> Trace:
        key = (strategy, tuple(sorted(params.items())), model_name, max_new_tokens)
        if key not in done:
            lm = model(model_name)
            if strategy == "eagle":
                params = {**params, "drafter": models["eagle-head"]}
            request = RunRequest.build(strategy, params, PROMPT, max_new_tokens=max_new_tokens, chat=False)
            with pytest.MonkeyPatch.context() as patch:
                # superposed's n-gram filter from the prompt alone: the stdlib-docstring corpus takes half a minute
                patch.setattr("explorer.strategies.superposed.corpus_ngrams", lambda tokenizer, vocab_size, order:
                              _prompt_ngrams(lm, order))
                done[key] = run_to_end(lm, request)
        return done[key]

    return trace_of


def _prompt_ngrams(lm, order: int) -> NgramModel:
    ngrams = NgramModel(order=order, vocab_size=lm.model.config.vocab_size, weights=(1.0,) * order)
    ngrams.add(lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    return ngrams


@pytest.fixture(scope="module")
def greedy(tiny):
    return run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=6, chat=False))


def renamed(trace: Trace, name: str = "renamed") -> Trace:
    return Trace(dataclasses.replace(trace.started, strategy=name), list(trace.events), trace.finished)


@pytest.mark.parametrize("case", CASES)
def test_a_view_picks_the_lane_that_holds_its_data(case, run, greedy):
    strategy, params, model, max_new_tokens = CASES[case]
    trace = run(strategy, params, model, max_new_tokens)
    view = get_view(_view(case))
    figure = view.render([greedy, trace], 0)  # lane 1 (greedy) is chosen: the view falls back to lane 2
    assert has_data(figure) and f"— 2: {strategy}" in figure.layout.title.text, figure.layout.title.text
    assert not has_data(view.render([greedy], 0))


@pytest.mark.parametrize("case", CASES)
def test_a_view_follows_the_data_when_the_strategy_is_renamed(case, run, greedy):
    strategy, params, model, max_new_tokens = CASES[case]
    trace = renamed(run(strategy, params, model, max_new_tokens))
    figure = get_view(_view(case)).render([greedy, trace], 0)
    assert has_data(figure) and "— 2: renamed" in figure.layout.title.text, figure.layout.title.text


@pytest.mark.parametrize("view", ALL_LANE_CASES)
def test_an_all_lane_view_draws_a_renamed_lane_and_skips_greedy(view, run, greedy):
    trace = renamed(run(*ALL_LANE_CASES[view]))
    assert has_data(get_view(view).render([greedy, trace], 0))
    assert not has_data(get_view(view).render([greedy], 0))
