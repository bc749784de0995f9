"""Superposed decoding: the authors' scoring (log-space mix, alpha, temperature, the no-support penalty, a
history that includes the prompt), the superposition, and the run's record."""

import math

import pytest
import torch

import explorer.strategies.superposed as superposed
from explorer.ngram import NgramModel, corpus_stats
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.superposed import (
    Draft,
    SuperposedConfig,
    expand,
    model_distribution,
    superposition_weights,
)
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


def test_the_defaults_are_the_authors():
    # params/p15_d3_mixed.json and sup_generate's penalty=200
    config = SuperposedConfig()
    assert (config.drafts, config.ngram_weight, config.temperature, config.sampled_tokens, config.penalty,
            config.ngram_order) == (3, 0.54, 0.06, 9, 200.0, 6)
    assert superposed.NGRAM_WEIGHTS == (0.01, 0.04, 0.15, 0.18, 0.12)


def tiny_table() -> NgramModel:
    """Contexts: (0,) -> 1 or 2 once each; (4, 0) -> 1 or 2 once each; nothing ever follows 5."""
    table = NgramModel(order=3, vocab_size=6, weights=(1.0, 1.0, 1.0))
    table.add([4, 0, 1, 4, 0, 2, 4, 1, 0])
    return table


def test_candidate_scores_are_the_authors_log_space_mix():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])
    config = SuperposedConfig(ngram_weight=0.54, temperature=0.5, sampled_tokens=3, ngram_order=3, penalty=200.0)
    tokens, probs = model_distribution(logits, config.temperature, config.sampled_tokens)
    # p_LLM: softmax(z / T) over the whole vocabulary, kept on its top 3 and renormalised
    tempered = [math.exp(z / 0.5) for z in logits.tolist()]
    p = {t: tempered[t] / sum(tempered[:3]) for t in range(3)}
    assert tokens == [0, 1, 2] and probs == pytest.approx([p[0], p[1], p[2]])

    prompt = [3, 4]
    drafts = [Draft([0], -1.0), Draft([5], -0.5)]  # histories (3, 4, 0): supported; (3, 4, 5): unseen
    candidates = expand(drafts, prompt, tokens, probs, tiny_table(), config)
    ngram = {1: 0.01 * 1 / 2 + 0.04 * 1 / 2, 2: 0.01 * 1 / 2 + 0.04 * 1 / 2}  # bigram (0,), trigram (4, 0)
    expected = {(0, t): -1.0 + 0.46 * math.log(p[t]) + 0.54 * math.log(ngram[t]) for t in (1, 2)}
    # draft 1: no sampled token has n-gram support -> (1 - alpha) log p - 200; draft 0's token 0 (P = 0) is vetoed
    expected |= {(1, t): -0.5 + 0.46 * math.log(p[t]) - 200.0 for t in range(3)}
    got = {(c.draft, c.token): c.score for c in candidates}
    assert got.keys() == expected.keys()
    for pair, score in expected.items():
        assert got[pair] == pytest.approx(score, abs=1e-6)  # p_LLM is float32, as the authors'
    assert [c.score for c in candidates] == sorted(got.values(), reverse=True)
    by_pair = {(c.draft, c.token): c for c in candidates}
    assert by_pair[(0, 1)].ngram_logprob == pytest.approx(math.log(0.025))
    assert by_pair[(1, 0)].ngram_logprob == -math.inf and by_pair[(1, 0)].model_logprob == pytest.approx(
        math.log(p[0]))


def test_the_prompt_is_part_of_the_ngram_history():
    config = SuperposedConfig(temperature=1.0, sampled_tokens=3, ngram_order=3)
    tokens, probs = [0, 1, 2], [0.5, 0.3, 0.2]
    # the empty first draft: its history is the prompt alone, whose tail (4, 0) has n-gram support
    candidates = expand([Draft([], 0.0)], [2, 4, 0], tokens, probs, tiny_table(), config)
    assert {c.token for c in candidates} == {1, 2}
    assert all(c.ngram_logprob == pytest.approx(math.log(0.025)) and c.score > -100 for c in candidates)
    # the same draft after a prompt with an unseen tail is penalised
    penalised = expand([Draft([], 0.0)], [2, 4, 5], tokens, probs, tiny_table(), config)
    assert all(c.score < -200 for c in penalised)


def test_the_run_scores_its_first_tokens_against_the_prompt(tiny_flat, monkeypatch):
    ids = tiny_flat.encode_prompt(PROMPT, chat=False)
    vocab = tiny_flat.model.config.vocab_size
    table = NgramModel(order=6, vocab_size=vocab, weights=(1.0,) * 6)
    for token in range(vocab):  # after the prompt's last token, every token once: P_ngram = 0.01 / vocab
        table.add([ids[-1], token])
    monkeypatch.setattr(superposed, "corpus_ngrams", lambda *args: table)
    trace = run_to_end(tiny_flat, RunRequest.build("superposed", {}, PROMPT, max_new_tokens=3, chat=False))
    first = next(e for e in trace.events if e.kind == "superposed_step")
    assert first.step == 0 and first.drafts == [""] and first.weights == [1.0]
    assert len(first.scores) == 9
    assert first.ngram_logprobs == pytest.approx([math.log(0.01 / vocab)] * 9)
    for model_logprob, score in zip(first.model_logprobs, first.scores, strict=True):
        assert score == pytest.approx(0.46 * model_logprob + 0.54 * math.log(0.01 / vocab), abs=1e-5)


def test_superposition_weights_are_the_drafts_normalised_probabilities():
    assert superposition_weights([0.0, math.log(3.0)]) == pytest.approx([0.25, 0.75])


def test_one_hot_superposition_is_the_token_itself(tiny):
    ids = tiny.encode_prompt(PROMPT, chat=False)
    plain, superposed_session = tiny.session(), tiny.session()
    plain.forward(ids[:-1])
    superposed_session.forward(ids[:-1])
    vector = tiny.model.get_input_embeddings()(torch.tensor([ids[-1]]))[0]
    torch.testing.assert_close(superposed_session.forward_embedding(vector).logits, plain.forward([ids[-1]]).logits[-1],
                               atol=1e-4, rtol=1e-4)


def test_the_run_keeps_the_best_candidates_and_commits_the_best_draft(tiny_flat):
    trace = run_to_end(tiny_flat, RunRequest.build("superposed", {"drafts": 3}, PROMPT, max_new_tokens=10,
                                                   chat=False))
    steps = [e for e in trace.events if e.kind == "superposed_step"]
    result = next(e for e in trace.events if e.kind == "superposed_result")
    assert [s.step for s in steps] == list(range(10))
    assert all(0 < len(s.scores) <= 9 * len(s.drafts) and s.kept == [0, 1, 2] for s in steps)
    assert all(sum(s.weights) == pytest.approx(1.0, abs=1e-5) for s in steps)  # weights are rounded
    means = [score / len(draft) for score, draft in zip(result.scores, result.drafts, strict=True)]
    assert means == sorted(means, reverse=True) and len(result.drafts) == 3  # best perplexity first
    assert trace.token_ids == result.drafts[result.chosen]
    assert len({tuple(d) for d in result.drafts}) == 3  # k different drafts from one pass per step
    assert trace.finished.target_forward_passes == 1 + 9 + 1  # prompt, one per later step, the commit pass
    figure = get_view("superposed").render([trace], 0)
    assert "3 drafts" in figure.layout.title.text
