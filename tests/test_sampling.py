"""Our sampling filters against transformers' logits processors on the same random logits."""

import pytest
import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from explorer import sampling
from explorer.sampling import SamplingFilters


def random_logits(seed: int, batch: int = 16, vocab: int = 400, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale


def same_support_and_values(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "kept sets differ"
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])


CASES = [
    (lambda x: sampling.temperature(x, 0.7), TemperatureLogitsWarper(0.7)),
    (lambda x: sampling.top_k_filter(x, 7), TopKLogitsWarper(7)),
    (lambda x: sampling.top_p_filter(x, 0.8), TopPLogitsWarper(0.8)),
    (lambda x: sampling.top_p_filter(x, 0.3), TopPLogitsWarper(0.3)),
    (lambda x: sampling.min_p_filter(x, 0.1), MinPLogitsWarper(0.1)),
    (lambda x: sampling.typical_filter(x, 0.7), TypicalLogitsWarper(0.7)),
    (lambda x: sampling.epsilon_filter(x, 0.01), EpsilonLogitsWarper(0.01)),
    (lambda x: sampling.eta_filter(x, 0.02), EtaLogitsWarper(0.02)),
]


@pytest.mark.parametrize("index", range(len(CASES)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_filter_matches_transformers(index, seed):
    ours, theirs = CASES[index]
    logits = random_logits(seed)
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    same_support_and_values(ours(logits), theirs(input_ids, logits.clone()))


def test_filters_actually_filter():
    logits = random_logits(3)
    kept = sampling.top_p_filter(logits, 0.5)
    assert torch.isinf(kept).any() and torch.isfinite(kept).sum(-1).min() >= 1


def test_repetition_penalty_matches_transformers():
    logits = random_logits(4, batch=1)
    context = [3, 17, 17, 250, 399]
    ours = sampling.repetition_penalty(logits, context, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context]), logits.clone())
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.8, top_k=50, top_p=0.9),
        dict(temperature=1.3, min_p=0.05, typical_p=0.9),
        dict(top_k=30, epsilon_cutoff=0.003, eta_cutoff=0.004),
        dict(temperature=0.6, top_p=0.95, min_p=0.02, repetition_penalty=1.2),
    ],
)
def test_composition_matches_transformers_order(kwargs):
    logits = random_logits(5, batch=1)
    context = [1, 2, 3, 5, 8, 13]
    hf = LogitsProcessorList()
    if kwargs.get("repetition_penalty", 1.0) != 1.0:
        hf.append(RepetitionPenaltyLogitsProcessor(kwargs["repetition_penalty"]))
    if kwargs.get("temperature", 1.0) != 1.0:
        hf.append(TemperatureLogitsWarper(kwargs["temperature"]))
    if kwargs.get("top_k"):
        hf.append(TopKLogitsWarper(kwargs["top_k"]))
    if kwargs.get("top_p", 1.0) < 1.0:
        hf.append(TopPLogitsWarper(kwargs["top_p"]))
    if kwargs.get("min_p"):
        hf.append(MinPLogitsWarper(kwargs["min_p"]))
    if kwargs.get("typical_p", 1.0) < 1.0:
        hf.append(TypicalLogitsWarper(kwargs["typical_p"]))
    if kwargs.get("epsilon_cutoff"):
        hf.append(EpsilonLogitsWarper(kwargs["epsilon_cutoff"]))
    if kwargs.get("eta_cutoff"):
        hf.append(EtaLogitsWarper(kwargs["eta_cutoff"]))
    ours = SamplingFilters(**kwargs).apply(logits[0], context)
    theirs = hf(torch.tensor([context]), logits.clone())[0]
    same_support_and_values(ours, theirs)


def test_entropy_matches_categorical():
    logits = random_logits(6)
    torch.testing.assert_close(sampling.entropy(logits), torch.distributions.Categorical(logits=logits).entropy())
    masked = sampling.top_k_filter(logits, 5)
    torch.testing.assert_close(sampling.entropy(masked), torch.distributions.Categorical(logits=masked).entropy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=2.0), "top_p must be in (0, 1]"),
        (dict(temperature=-1.0), "temperature must be > 0"),
        (dict(top_k=-3), "top_k must be >= 0"),
        (dict(min_p=1.5), "min_p must be in [0, 1)"),
    ],
)
def test_bad_filter_values_say_how_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingFilters(**kwargs)


def test_step_stats_one_transfer_values():
    logits = random_logits(7, batch=1)[0]
    kept = sampling.top_k_filter(logits, 3)
    token = int(torch.argsort(logits, descending=True)[2])
    stats = sampling.step_stats(logits, kept, token, top_k=10)
    logp = torch.log_softmax(logits, -1)
    assert stats.rank == 2
    assert stats.logprob == pytest.approx(float(logp[token]), abs=1e-6)
    assert stats.kept_count == 3 and len(stats.kept_top_ids) == 3
    assert stats.top_ids == torch.topk(logp, 10).indices.tolist()
    assert stats.entropy == pytest.approx(float(sampling.entropy(logits)), abs=1e-5)
    assert sum(torch.tensor(stats.kept_top_logprobs).exp()) == pytest.approx(1.0, abs=1e-5)
