"""The engines' acceptance definitions on hand-built runs where they disagree: a step that drafted nothing, an
adaptive draft length, a tree round. Every expected number is worked out by hand from the engine's definition
(explorer/engines.py cites where each engine defines it), not by calling our formula."""

from __future__ import annotations

import pytest

from explorer.engines import (
    SpecSteps,
    aiperf_histogram,
    conditional_acceptance,
    engine_metrics,
    mean_rate_by_position,
    sglang_metrics,
    spec_steps,
    vllm_metrics,
)
from explorer.events import DraftRound, RunFinished, RunStarted, TokenStep
from explorer.trace import Trace


def started(run_id: str = "0123456789ab", strategy: str = "speculative") -> RunStarted:
    return RunStarted(run_id=run_id, strategy=strategy, config={}, model_id="tiny", weights_hash="h", dtype="float32",
                      device="cpu", seed=0, versions={}, prompt="p", chat=False, system_prompt=None, prompt_ids=[1],
                      max_new_tokens=32, stop_strings=[], created_at="2026-12-07T00:00:00+00:00")


def token(step: int, origin: str) -> TokenStep:
    return TokenStep(step=step, position=step + 1, token_id=5, token_text="a", logprob=-0.1, rank=0, entropy=0.5,
                     top_ids=[5], top_logprobs=[-0.1], top_texts=["a"], kept_top_ids=[5], kept_top_logprobs=[0.0],
                     kept_count=1, kept_logprob=0.0, origin=origin)


def draft_round(index: int, parents: list[int], path: list[int], position: int = 0) -> DraftRound:
    """A round over a draft tree (`parents`) whose accepted path is the nodes `path`, drafting from `position`."""
    n = len(parents)
    verdicts = ["accepted" if i in path else "rejected" for i in range(n)]
    return DraftRound(round=index, position=position, drafter="d", rule="greedy", draft_tokens=[5] * n,
                      draft_texts=["a"] * n, parents=parents, q=[1.0] * n, p=[0.5] * n, u=[None] * n,
                      verdicts=verdicts, accepted_count=len(path), bonus_token=5, bonus_text="a", bonus_kind="bonus",
                      draft_time_s=0.01, verify_time_s=0.02)


def run(steps: list[tuple[list[int], list[int]] | None]) -> Trace:
    """A run of verification steps: (draft tree parents, accepted path) for a round, None for a plain step."""
    trace = Trace(started())
    step = 0
    for index, spec in enumerate(steps):
        if spec is None:
            trace.add(token(step, "plain"))
            step += 1
            continue
        parents, path = spec
        trace.add(draft_round(index, parents, path, position=step + 1))
        for _ in path:
            trace.add(token(step, "draft"))
            step += 1
        trace.add(token(step, "bonus"))
        step += 1
    trace.add(RunFinished(status="ok", stop_reason="length", error=None, text="a" * step, new_tokens=step,
                          wall_time_s=1.0, prefill_time_s=0.1, target_forward_passes=len(steps)))
    return trace


CHAIN4, CHAIN2 = [-1, 0, 1, 2], [-1, 0]
# an adaptive draft length and a step with no draft: chain 4 accepting 2; plain; chain 2 accepting 2; chain 4
# accepting none. 8 tokens in 4 verification passes, 3 of them drafted, 10 draft tokens, 4 accepted.
ADAPTIVE = [(CHAIN4, [0, 1]), None, (CHAIN2, [0, 1]), (CHAIN4, [])]


def test_a_step_without_a_draft_splits_vllm_from_sglang():
    s = spec_steps(run(ADAPTIVE))
    assert (s.steps, s.draft_steps, s.drafted_tokens, s.accepted_tokens, s.output_tokens) == (4, 3, 10, 4, 8)
    vllm = vllm_metrics(s)
    assert vllm["num_spec_steps"] == 3 and vllm["num_draft_tokens"] == 10 and vllm["num_accepted_draft_tokens"] == 4
    assert vllm["mean_acceptance_length"] == pytest.approx(1 + 4 / 3)  # drafts only, +1 for the bonus
    assert vllm["draft_acceptance_rate"] == pytest.approx(0.4)
    assert vllm["acceptance_histogram"] == [1, 0, 2, 0, 0]  # over the 3 drafts: accepted 2, 2, 0
    assert vllm["per_step_accepted"] == [2, 2, 0] and vllm["per_step_drafted"] == [4, 2, 4]
    sglang = sglang_metrics(s)
    assert sglang["spec_verify_ct"] == 4 and sglang["spec_accept_length"] == pytest.approx(2.0)  # 8 tokens / 4
    # against the nominal budget: 4 passes x k = 4, not the 10 tokens proposed
    assert sglang["spec_num_proposed_drafts"] == 16 and sglang["spec_accept_rate"] == pytest.approx(4 / 16)
    assert sglang["spec_correct_drafts_histogram"] == [2, 0, 2]  # the plain pass accepted 0 too; grown, not padded
    assert aiperf_histogram(s) == {"0": 1, "2": 2}  # sparse, drafts only, bonus excluded


def test_an_adaptive_draft_length_splits_the_per_position_rates():
    s = spec_steps(run(ADAPTIVE))
    # vLLM: accepted at i / every draft (3): the chain of 2 never proposed positions 2, 3 but counts against them
    assert vllm_metrics(s)["per_position_acceptance_rate"] == pytest.approx([2 / 3, 2 / 3, 0, 0])
    # over the drafts that proposed i: positions 2 and 3 were proposed twice (the chains of 4)
    assert mean_rate_by_position(s) == pytest.approx([2 / 3, 2 / 3, 0, 0])
    # conditional (SGLang PR #31750): position 1 is observed only where 0 was accepted (2 steps, both accepted 1);
    # position 2 only by the chain of 4 that accepted 2 (rejected there); position 3 by no step
    assert conditional_acceptance(s) == [pytest.approx(2 / 3), 1.0, 0.0, None]


def test_the_mean_and_conditional_rates_part_where_a_draft_was_shorter():
    # chain 4 accepting 3, chain 1 accepting 1: position 1 was proposed once (vLLM still divides by 2)
    s = spec_steps(run([(CHAIN4, [0, 1, 2]), ([-1], [0])]))
    assert vllm_metrics(s)["per_position_acceptance_rate"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert mean_rate_by_position(s) == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert conditional_acceptance(s) == pytest.approx([1.0, 1.0, 1.0, 0.0])


def test_a_tree_round_counts_nodes_as_drafted_and_depth_as_positions():
    # five nodes in two branches: 0 -> 2 -> 4 and 1 -> 3; the path 0 -> 2 is accepted
    s = spec_steps(run([([-1, -1, 0, 1, 2], [0, 2])]))
    assert (s.drafted, s.depth, s.accepted) == ((5,), (3,), (2,))
    assert vllm_metrics(s)["draft_acceptance_rate"] == pytest.approx(2 / 5)  # nodes, not depth
    assert vllm_metrics(s)["mean_acceptance_length"] == pytest.approx(3.0)
    assert sglang_metrics(s)["spec_accept_length"] == pytest.approx(3.0)
    assert sglang_metrics(s)["spec_accept_rate"] == pytest.approx(2 / 3)  # the budget is the depth: 3
    assert vllm_metrics(s)["per_position_acceptance_rate"] == pytest.approx([1.0, 1.0, 0.0])


def test_a_run_that_never_drafted_has_no_engine_metrics():
    assert spec_steps(run([None, None])) is None and engine_metrics(run([None])) is None


def test_totals_only_records_give_what_totals_can():
    s = SpecSteps(steps=10, draft_steps=8, drafted_tokens=32, accepted_tokens=12, output_tokens=22,
                  accepted_per_position=(7, 4, 1, 0), per_step=False)
    assert vllm_metrics(s)["mean_acceptance_length"] == pytest.approx(2.5)
    assert vllm_metrics(s)["per_position_acceptance_rate"] == pytest.approx([7 / 8, 4 / 8, 1 / 8, 0])
    assert "acceptance_histogram" not in vllm_metrics(s) and aiperf_histogram(s) == {}
    assert conditional_acceptance(s) == [] and sglang_metrics(s)["spec_accept_length"] == pytest.approx(2.2)
    assert sglang_metrics(s)["spec_accept_rate"] == pytest.approx(12 / 40)  # 10 passes x a budget of 4


def test_per_step_counts_that_cannot_be_are_refused():
    with pytest.raises(ValueError, match="accepted more"):
        SpecSteps.of_steps([2], [2], [3])


def steps_from_histogram(histogram: list[int], k: int) -> SpecSteps:
    accepted = [j for j, count in enumerate(histogram) for _ in range(count)]
    return SpecSteps.of_steps([k] * len(accepted), [k] * len(accepted), accepted)


def test_vllm_numbers_of_its_own_example_response():
    """vLLM PR #48915's example `metrics.speculative_decoding` (k = 3): the same steps give the same numbers."""
    reported = {"mean_acceptance_length": 1.2325581395348837, "draft_acceptance_rate": 0.07751937984496124,
                "acceptance_histogram": [39, 1, 0, 3], "num_spec_steps": 43, "num_accepted_draft_tokens": 10,
                "num_draft_tokens": 129, "num_spec_tokens": 3}
    ours = vllm_metrics(steps_from_histogram(reported["acceptance_histogram"], 3))
    for key, value in reported.items():
        assert ours[key] == pytest.approx(value), key


def test_sglang_numbers_of_a_real_meta_info():
    """A meta_info posted on SGLang PR #33518 (draft budget 5): 43 verify passes, 63 correct drafts of 215,
    106 completion tokens."""
    reported = {"spec_accept_rate": 0.2930232558139535, "spec_accept_length": 2.4651162790697674,
                "spec_num_correct_drafts": 63, "spec_num_proposed_drafts": 215, "spec_verify_ct": 43,
                "spec_correct_drafts_histogram": [11, 14, 11, 4, 0, 3]}
    ours = sglang_metrics(steps_from_histogram(reported["spec_correct_drafts_histogram"], 5))
    for key, value in reported.items():
        assert ours[key] == pytest.approx(value), key
