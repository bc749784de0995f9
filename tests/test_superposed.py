"""Superposed decoding: the n-gram filter, the superposition, the k^2 expansion, and the run's record."""

import math

import pytest
import torch

from explorer.ngram import NgramModel, corpus_stats
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.superposed import Draft, expand, superposition_weights
from viz.catalog import get_view

PROMPT = "the cat sat on the mat. the cat"


def test_ngram_probabilities_are_a_distribution_and_interpolate():
    model = NgramModel(order=2, vocab_size=4, weights=(1.0, 1.0))
    model.add([0, 1, 2, 0, 1, 3, 0, 1, 2])
    for history in ([0], [3], []):
        assert sum(model.probability(history, t) for t in range(4)) == pytest.approx(1.0)
    unigram = [(model.counts[0][(t,)] + 1) / (9 + 4) for t in range(4)]
    # after 1: bigram P(2 | 1) = 2/3, half-weighted with the unigram
    assert model.probability([0, 1], 2) == pytest.approx(0.5 * unigram[2] + 0.5 * 2 / 3)
    assert corpus_stats()["characters"] > 100_000  # the stdlib docstrings are there to build from


def test_superposition_weights_and_the_k_squared_expansion():
    assert superposition_weights([0.0, math.log(3.0)]) == pytest.approx([0.25, 0.75])

    class Flat:
        def probability(self, history, token):
            return 0.5 if token == history[-1] else 0.1  # the filter likes repeating the draft's last token

    logp = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    drafts = [Draft([0], -1.0), Draft([1], -1.2)]
    candidates = expand(drafts, logp, 2, Flat(), 0.5)
    assert len(candidates) == 4 and candidates == sorted(candidates, key=lambda c: -c[4])
    by_pair = {(c[0], c[1]): c for c in candidates}
    assert by_pair[(1, 1)][4] == pytest.approx(-1.2 + math.log(0.5 * 0.3 + 0.5 * 0.5))
    assert by_pair[(0, 1)][3] == pytest.approx(math.log(0.1))


def test_one_hot_superposition_is_the_token_itself(tiny):
    ids = tiny.encode_prompt(PROMPT, chat=False)
    plain, superposed = tiny.session(), tiny.session()
    plain.forward(ids[:-1])
    superposed.forward(ids[:-1])
    vector = tiny.model.get_input_embeddings()(torch.tensor([ids[-1]]))[0]
    torch.testing.assert_close(superposed.forward_embedding(vector), plain.forward([ids[-1]])[-1], atol=1e-4,
                               rtol=1e-4)


def test_the_run_keeps_the_best_candidates_and_commits_the_best_draft(tiny_flat):
    trace = run_to_end(tiny_flat, RunRequest.build("superposed", {"drafts": 3}, PROMPT, max_new_tokens=10,
                                                   chat=False))
    steps = [e for e in trace.events if e.kind == "superposed_step"]
    result = next(e for e in trace.events if e.kind == "superposed_result")
    assert len(steps) == 9 and all(len(s.scores) == 9 and s.kept == [0, 1, 2] for s in steps)
    assert all(sum(s.weights) == pytest.approx(1.0) for s in steps)
    assert result.scores == sorted(result.scores, reverse=True) and len(result.drafts) == 3
    assert trace.token_ids == result.drafts[result.chosen]
    assert len({tuple(d) for d in result.drafts}) == 3  # k different drafts from one pass per step
    assert trace.finished.target_forward_passes == 1 + 9 + 1  # prompt, one per step, the commit pass
    figure = get_view("superposed").render([trace], 0)
    assert "3 drafts" in figure.layout.title.text
