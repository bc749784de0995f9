"""`python -m explorer check` (explorer/check.py): it passes correct methods and fails planted wrong ones with the
right reason: a drafter whose drafts are never verified, a sampler that drops the top token's mass, a parameter
with no declared range."""

import math
from dataclasses import dataclass

import pytest
import torch

from explorer.check import check, chi_square, exact_distribution, first_difference, total_variation
from explorer.cli import main
from explorer.params import param
from explorer.sampling import sample
from explorer.strategies.acceptance import Judgement, NodeRule
from explorer.strategies.base import REGISTRY, Choice, autoregressive, register
from explorer.strategies.draft_verify import choose_plain, draft_verify
from explorer.strategies.prompt_lookup import PromptLookupConfig, PromptLookupDrafter
from explorer.strategies.sample import SampleConfig


class AcceptEverything(NodeRule):
    """The planted bug: the first child of every node is committed without looking at the target."""

    def __init__(self, config):
        self.config = config

    def judge(self, row, kids, draft, history, rng, walk):
        if kids:
            walk.verdicts[kids[0]] = "accepted"
            return Judgement(child=kids[0])
        return Judgement(token=choose_plain(row, self.config, history, rng)[0])


def unverified(model, prompt_ids, config, rng):
    yield from draft_verify(model, prompt_ids, PromptLookupDrafter(config), config, rng,
                            acceptance=AcceptEverything(config))


def dropped_mass(model, prompt_ids, config, rng):
    def choose(logits, context):
        kept = config.apply(logits, context).clone()
        kept[int(kept.argmax())] = -math.inf  # the planted bug: the most likely token can never come out
        return Choice(sample(kept, rng), kept)

    yield from autoregressive(model, prompt_ids, choose)


@dataclass(frozen=True)
class UnboundedConfig(SampleConfig):
    spread: float = param(1.0, "a parameter whose range is not declared")


def plain_sample(model, prompt_ids, config, rng):
    yield from autoregressive(model, prompt_ids, lambda logits, context: Choice(sample(logits, rng)))


PLANTED = {"planted_unverified": (unverified, PromptLookupConfig),
           "planted_dropped_mass": (dropped_mass, SampleConfig),
           "planted_unbounded": (plain_sample, UnboundedConfig)}


@pytest.fixture(scope="module")
def planted():
    """The planted strategies, in the registry for this module only."""
    for name, (run, config) in PLANTED.items():
        register(name, config, "a planted wrong strategy (tests/test_check.py)")(run)
    yield
    for name in PLANTED:
        REGISTRY.pop(name)


def by_name(results):
    return {result.name: result for result in results}


def test_the_statistics_by_hand():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None and first_difference([1, 2], [1, 2, 3]) == 2
    exact = exact_distribution(lambda prefix: torch.tensor([0.25, 0.75]) if not prefix else torch.tensor([1.0, 0.0]),
                               2)
    assert exact == {(0, 0): 0.25, (0, 1): 0.0, (1, 0): 0.75, (1, 1): 0.0}
    assert chi_square({(0, 0): 25, (1, 0): 75}, exact) == (0.0, 1, 1.0)
    statistic, df, p_value = chi_square({(0,): 40, (1,): 60}, {(0,): 0.5, (1,): 0.5})  # (10² + 10²) / 50 = 4
    assert (statistic, df) == (4.0, 1) and p_value == pytest.approx(0.0455, abs=1e-4)  # the chi-square table
    assert chi_square({(0, 1): 1, (0, 0): 99}, exact)[2] == 0.0  # an impossible sequence came out
    assert total_variation({(0, 0): 50, (1, 0): 50}, exact) == pytest.approx(0.25)


def test_a_correct_lossless_method_passes_every_check(tiny_dir):
    results = check("prompt_lookup", lossless=True, exact_sampling=True, model=str(tiny_dir),
                    architectures=("llama", "gpt2"), runs=300)
    assert [r.verdict for r in results] == ["PASS"] * 5, results
    rows = by_name(results)
    assert "2 architectures x 3 prompts" in rows["greedy identity (tiny models)"].detail
    assert "chi2 = " in rows["exact sampling (toy vocabulary)"].detail
    assert "2 runs read back equal" in rows["store and JSONL round trip"].detail  # the greedy and sampling rules


def test_a_drafter_whose_verification_is_skipped_fails_both_claims(planted):
    rows = by_name(check("planted_unverified", lossless=True, exact_sampling=True, architectures=("llama",),
                         real_model=False, runs=200))
    greedy = rows["greedy identity (tiny models)"]
    assert greedy.passed is False and "tiny-random-llama, prompt " in greedy.detail and "position " in greedy.detail
    sampled = rows["exact sampling (toy vocabulary)"]
    assert sampled.passed is False and "prompt 'abcabca', position " in sampled.detail
    assert rows["parameters"].passed and rows["store and JSONL round trip"].passed  # only the claims fail


def test_a_sampler_that_drops_mass_fails_at_the_first_token(planted):
    rows = by_name(check("planted_dropped_mass", exact_sampling=True, runs=200))
    sampled = rows["exact sampling (toy vocabulary)"]
    assert sampled.passed is False and "position 0: chi2 = " in sampled.detail
    assert "'b' in 0.000 of 200 runs, exact 0.478" in sampled.detail  # the toy target's most likely first token


def test_a_parameter_without_a_range_fails(planted):
    rows = by_name(check("planted_unbounded"))
    assert rows["parameters"].passed is False
    assert rows["parameters"].detail.startswith("spread=1e30 is accepted: declare its range")


def test_the_command_prints_the_table_and_exits_by_the_verdict(planted, capsys):
    assert main(["check", "--strategy", "speculative", "--exact-sampling", "--runs", "200"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["check", "verdict", "detail"]
    assert "exact sampling (toy vocabulary)  PASS" in out and "FAIL" not in out
    assert main(["check", "--strategy", "planted_dropped_mass", "--exact-sampling", "--runs", "50"]) == 1
    assert "exact sampling (toy vocabulary)  FAIL     prompt 'abcabca', position 0" in capsys.readouterr().out
    for argv, message in [(["--strategy", "nope"], "unknown strategy 'nope'"),
                          (["--strategy", "sample", "--param", "top_p=2"], "top_p must be in"),
                          (["--strategy", "sample", "--runs", "5"], "runs must be between 10 and 100000"),
                          (["--strategy", "sample", "--lossless", "--architectures", "bert"], "unknown architecture"),
                          (["--strategy", "sample", "--model", "x"], "add --lossless"),
                          (["--strategy", "sample", "--lossless", "--model", "/no/such/model"], "could not be loaded")]:
        assert main(["check", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
