"""Constrained decoding: AWRS is exact for the constrained distribution and its weight is unbiased for Z (toy
vocabulary); masking is the baseline; the strategy on the embedded model (llguidance regex / JSON schema)."""

import json
import math
import re

import pytest
import torch

from explorer.constraints import GrammarConstraint, PrefixConstraint
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.constrained import awrs_step, masked_step
from viz.catalog import get_view

P = torch.tensor([0.30, 0.05, 0.25, 0.02, 0.08, 0.30], dtype=torch.float64)
ALLOWED = {1, 3, 4}  # Z = 0.15: most of p's mass is on tokens the constraint refuses


def test_awrs_draws_exactly_from_the_constrained_distribution_with_unbiased_weights():
    g = torch.Generator().manual_seed(0)
    logp = torch.log(P)
    counts = torch.zeros(6)
    weights, evaluations = [], []
    n = 20000
    for _ in range(n):
        draw = awrs_step(logp, lambda t: t in ALLOWED, g)
        counts[draw.token] += 1
        weights.append(math.exp(draw.log_weight))
        evaluations.append(draw.evaluations)
        assert draw.token in ALLOWED and not set(draw.rejected) & ALLOWED
    z = float(P[list(ALLOWED)].sum())
    target = torch.zeros(6, dtype=torch.float64)
    target[list(ALLOWED)] = P[list(ALLOWED)] / z
    assert 0.5 * float((counts / n - target).abs().sum()) < 0.015
    assert sum(weights) / n == pytest.approx(z, rel=0.05)  # E[w] = Z
    assert max(evaluations) <= 6 and sum(evaluations) / n < 6  # fewer than the mask's |V| on average


def test_the_mask_baseline_gives_the_exact_normaliser():
    allowed = torch.tensor([t in ALLOWED for t in range(6)])
    token, log_z = masked_step(torch.log(P), allowed, torch.Generator().manual_seed(1))
    assert token in ALLOWED and log_z == pytest.approx(math.log(0.15))
    assert masked_step(torch.log(P), torch.zeros(6, dtype=torch.bool), torch.Generator())[0] is None


def test_awrs_reports_a_dead_end_with_zero_weight():
    draw = awrs_step(torch.log(P), lambda t: False, torch.Generator().manual_seed(2))
    assert draw.token is None and draw.log_weight == -math.inf and draw.evaluations == 6


def test_prefix_constraint_counts_evaluations_and_masks():
    constraint = PrefixConstraint(lambda seq: seq[-1] % 2 == 0)
    assert constraint.mask(6).tolist() == [True, False, True, False, True, False] and constraint.evaluations == 6


def test_bad_patterns_are_one_line_errors(embedded):
    with pytest.raises(ValueError, match="cannot compile the regex"):
        GrammarConstraint(embedded.tokenizer, "regex", "([a-z")
    with pytest.raises(ValueError, match="at most"):
        GrammarConstraint(embedded.tokenizer, "regex", "a" * 5000)
    with pytest.raises(ValueError, match="cannot compile the json schema"):
        GrammarConstraint(embedded.tokenizer, "json_schema", "{not json")


@pytest.mark.integration
@pytest.mark.parametrize("method", ["awrs", "mask"])
def test_the_output_matches_the_regex_and_awrs_asks_far_less(embedded, method):
    pattern = r"(Yes|No), because [a-z ,]{10,60}\."
    trace = run_to_end(embedded, RunRequest.build(
        "constrained", {"pattern": pattern, "method": method, "compare": True},
        "Is the sky blue? Answer yes or no and say why.", max_new_tokens=48, seed=3))
    text = trace.text
    assert trace.finished.status == "ok" and re.fullmatch(pattern, text), text
    steps = trace.token_steps
    if method == "awrs":
        assert sum(s.details["evaluations"] for s in steps) < 0.05 * sum(s.details["mask_evaluations"] for s in steps)
    else:
        assert all(s.details["log_weight"] == pytest.approx(s.details["exact_log_z"]) for s in steps)
    assert get_view("constraint").render([trace], 0).data


@pytest.mark.integration
def test_a_json_schema_constrains_the_output(embedded):
    schema = json.dumps({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}},
                         "required": ["answer"], "additionalProperties": False})
    trace = run_to_end(embedded, RunRequest.build("constrained", {"kind": "json_schema", "pattern": schema},
                                                  "What is the capital of France? Reply in JSON.",
                                                  max_new_tokens=40, seed=0))
    assert set(json.loads(trace.text)) == {"answer"}


@pytest.mark.parametrize("method", ["awrs", "mask"])
def test_the_strategy_on_a_tiny_character_model(tiny_flat, method):
    pattern = "(cat|dog)s? [a-z]{2,6}"
    trace = run_to_end(tiny_flat, RunRequest.build("constrained", {"pattern": pattern, "method": method}, "the cat",
                                                   max_new_tokens=30, chat=False, seed=1))
    assert trace.finished.status == "ok" and re.fullmatch(pattern, trace.text)
    assert trace.token_steps[-1].token_id in tiny_flat.eos_token_ids  # the constraint completed, then the end


def test_a_pattern_is_checked_before_the_run_and_escaped_in_titles(tiny_flat):
    from explorer.strategies import get_strategy, make_config
    from viz.labels import lane_name

    with pytest.raises(ValueError, match="1 to 2000 characters"):
        make_config("constrained", {"pattern": ""})
    with pytest.raises(ValueError, match="cannot compile the regex"):
        get_strategy("constrained").prepare(tiny_flat, make_config("constrained", {"pattern": "(unclosed"}))
    trace = run_to_end(tiny_flat, RunRequest.build("constrained", {"pattern": "<b>x</b>|<script>"}, "hi",
                                                   max_new_tokens=12, chat=False, seed=1))
    assert "<script>" not in lane_name(trace, 0) and "&lt;script&gt;" in lane_name(trace, 0)
    assert "<script" not in get_view("constraint").render([trace], 0).layout.title.text
