"""Masked diffusion LMs: the mask-predict sampler, its commit rules on hand-built tables, the schedules (Prophet,
CreditDecoding), the tiny ModernBERT adapter, and the unmasking record through store and Parquet."""

import math

import pytest
import torch

from explorer.cli import main
from explorer.events import UnmaskStep
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.credit_decoding import fuse, update_credits
from explorer.strategies.prophet import ProphetConfig, ProphetSchedule, gap_threshold, logit_gaps
from explorer.strategies.unmasking import StepView, commit_above, commit_top, position_scores, transfer_counts
from explorer.testing import save_tiny_masked_lm, tiny_masked_lm

PROMPT = "the cat sat on the mat. the cat"


def unmask_steps(trace) -> list[UnmaskStep]:
    return [e for e in trace.events if e.kind == "unmask_step"]


@pytest.fixture(scope="module")
def masked_lm():
    return tiny_masked_lm(0)


def test_one_position_blocks_with_low_confidence_are_greedy_on_a_causal_lm(tiny):
    """steps = gen_length, block_length = 1, low-confidence commit, the model's causal attention with the shift:
    every step commits the one position of its block with the argmax, i.e. greedy AR decoding."""
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=20, chat=False))
    diffusion = run_to_end(tiny, RunRequest.build("diffusion", {"block_length": 1}, PROMPT, max_new_tokens=20,
                                                  chat=False))
    assert diffusion.token_ids == greedy.token_ids
    assert diffusion.finished.target_forward_passes == 20 and len(unmask_steps(diffusion)) == 20
    assert [s.origin for s in diffusion.token_steps] == ["unmasked"] * 20
    assert [s.logprob for s in diffusion.token_steps] == pytest.approx([s.logprob for s in greedy.token_steps],
                                                                     abs=1e-4)


def test_llada_schedule_and_commit_rules_on_hand_built_tables():
    assert transfer_counts(10, 4) == [3, 3, 2, 2] and transfer_counts(3, 5) == [1, 1, 1, 0, 0]
    scores = torch.tensor([0.9, 0.2, 0.95, 0.5, 0.99], dtype=torch.float64)
    eligible = torch.tensor([True, True, True, True, False])  # the last is outside the block
    assert commit_top(scores, eligible, 2).tolist() == [True, False, True, False, False]
    assert commit_top(scores, eligible, 9).tolist() == [True, True, True, True, False]
    assert commit_above(scores, eligible, 0.85).tolist() == [True, False, True, False, False]
    assert commit_above(scores, eligible, 0.999).tolist() == [False, False, True, False, False]  # at least one
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], dtype=torch.float64)
    proposals = torch.tensor([0, 1])
    assert position_scores(probs, proposals, "low_confidence", None).tolist() == pytest.approx([0.7, 0.35])
    assert position_scores(probs, proposals, "margin", None).tolist() == pytest.approx([0.5, 0.05])
    entropy = -sum(p * math.log(p) for p in (0.4, 0.35, 0.25))
    assert position_scores(probs, proposals, "entropy", None)[1] == pytest.approx(-entropy)


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.99])
def test_threshold_decoding_commits_at_least_one_per_step_and_leaves_no_mask(tiny, threshold):
    trace = run_to_end(tiny, RunRequest.build("diffusion", {"threshold": threshold, "block_length": 8}, PROMPT,
                                              max_new_tokens=24, chat=False))
    steps = unmask_steps(trace)
    assert all(len(s.committed) >= 1 for s in steps)
    assert all(s.confidences[s.masked.index(p)] >= threshold
               for s in steps for p in s.committed[1:] if len(s.committed) > 1)
    committed = sorted(p for s in steps for p in s.committed)
    assert committed == list(range(24)) and len(trace.token_ids) == 24  # every position once, none left masked
    assert trace.finished.target_forward_passes == len(steps)


def test_blocks_are_decoded_left_to_right_with_their_share_of_the_steps(tiny):
    trace = run_to_end(tiny, RunRequest.build("diffusion", {"block_length": 8, "steps": 8}, PROMPT,
                                              max_new_tokens=24, chat=False))
    steps = unmask_steps(trace)
    assert [(s.block_start, s.block_end) for s in steps] == [(0, 8)] * 3 + [(8, 16)] * 3 + [(16, 24)] * 2
    assert [len(s.committed) for s in steps] == [3, 3, 2, 3, 3, 2, 4, 4]  # 8 steps over 3 blocks: 3, 3, 2
    assert all(s.block_start <= p < s.block_end for s in steps for p in s.committed)


def test_sampling_is_seeded(tiny):
    def run(seed):
        return run_to_end(tiny, RunRequest.build("diffusion", {"temperature": 1.0, "remasking": "random"}, PROMPT,
                                                 max_new_tokens=16, chat=False, seed=seed)).token_ids

    assert run(3) == run(3) and run(3) != run(4)


def test_prophet_goes_all_in_once_the_gap_clears_its_falling_threshold(tiny):
    config = ProphetConfig(tau_high=9.0, tau_mid=6.0, tau_low=3.0)
    assert [gap_threshold(config, p) for p in (0.0, 0.34, 0.7)] == [9.0, 6.0, 3.0]
    assert logit_gaps(torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.5]])).tolist() == [2.0, 0.5]
    eager = run_to_end(tiny, RunRequest.build("prophet", {"tau_high": 0, "tau_mid": 0, "tau_low": 0}, PROMPT,
                                              max_new_tokens=16, chat=False))
    steps = unmask_steps(eager)
    assert len(steps) == 1 and steps[0].all_in and len(steps[0].committed) == 16  # all-in at the first step
    never = run_to_end(tiny, RunRequest.build("prophet", {"tau_high": 50, "tau_mid": 50, "tau_low": 50}, PROMPT,
                                              max_new_tokens=16, chat=False))
    base = run_to_end(tiny, RunRequest.build("diffusion", {}, PROMPT, max_new_tokens=16, chat=False))
    assert not any(s.all_in for s in unmask_steps(never)) and never.token_ids == base.token_ids
    with pytest.raises(ValueError, match="tau_high"):
        RunRequest.build("prophet", {"tau_high": 1, "tau_mid": 2}, PROMPT)


def test_prophet_all_in_commits_the_noised_predictions_of_a_normal_step(tiny):
    """At temperature > 0 a step's x̂ is the argmax of Gumbel-noised logits; the all-in commit fills the remaining
    masks with that same x̂ (the authors' generate: x[remaining_mask] = x0[remaining_mask]), not the plain argmax."""
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 6.0]])
    noised = torch.tensor([1, 1, 0])  # what Gumbel noise might have drawn: not the argmax at rows 0 and 2
    probs = torch.softmax(logits.double(), dim=-1)
    view = StepView(0, 0, 4, 0.0, torch.arange(3), torch.tensor([True, True, False]), logits, probs, noised,
                    probs.gather(1, noised[:, None])[:, 0], 1)
    decision = ProphetSchedule(ProphetConfig(tau_high=0.0, tau_mid=0.0, tau_low=0.0, temperature=1.0)).decide(view)
    assert decision.all_in and decision.committed.tolist() == [True, True, True]
    committed = decision.proposals if decision.proposals is not None else view.proposals
    assert committed.tolist() == [1, 1, 0]

    trace = run_to_end(tiny, RunRequest.build("prophet", {"tau_high": 0, "tau_mid": 0, "tau_low": 0,
                                                          "temperature": 1.5}, PROMPT, max_new_tokens=16,
                                              chat=False, seed=7))
    (step,) = unmask_steps(trace)
    assert step.all_in and step.committed == step.masked
    assert step.committed_ids == step.predicted_ids  # the noised x̂ of this very step
    assert trace.token_ids == step.predicted_ids


def test_trace_credit_decays_accumulates_and_lifts_a_stable_token():
    credits: dict[int, float] = {}
    update_credits(credits, 5, 0.64, gamma=0.5, alpha=0.5)
    update_credits(credits, 5, 0.64, gamma=0.5, alpha=0.5)
    update_credits(credits, 2, 0.25, gamma=0.5, alpha=0.5)
    assert credits[5] == pytest.approx((0.8 * 0.5 + 0.8) * 0.5) and credits[2] == pytest.approx(0.5)
    logits = torch.zeros(8)
    fused = fuse(logits, credits, 0.7)
    assert fused[5] == pytest.approx(0.7 * math.log1p(credits[5])) and fused[0] == 0.0
    assert torch.softmax(fused, -1)[5] > torch.softmax(logits, -1)[5]


def test_credit_decoding_commits_by_fused_confidence(tiny):
    trace = run_to_end(tiny, RunRequest.build("credit_decoding", {"block_length": 8}, PROMPT, max_new_tokens=16,
                                              chat=False))
    steps = unmask_steps(trace)
    assert sorted(p for s in steps for p in s.committed) == list(range(16))
    for step in steps:
        assert len(step.scores) == len(step.masked)
        fused = [step.scores[step.masked.index(p)] for p in step.committed]
        assert len(step.committed) == 1 or all(f >= 0.95 for f in fused)


def test_a_masked_lm_is_a_diffusion_model_and_refuses_other_strategies(masked_lm, tmp_path):
    from explorer.models import load_model

    trace = run_to_end(masked_lm, RunRequest.build("diffusion", {"block_length": 4}, "Hello", max_new_tokens=12))
    assert trace.status == "ok" and len(trace.token_ids) == 12
    loaded = load_model(str(save_tiny_masked_lm(tmp_path / "mlm")))
    assert loaded.diffusion == masked_lm.diffusion and not loaded.diffusion.shift
    again = run_to_end(loaded, RunRequest.build("diffusion", {"block_length": 4}, "Hello", max_new_tokens=12))
    assert again.token_ids == trace.token_ids
    with pytest.raises(ValueError, match="masked diffusion LM: choose a diffusion strategy"):
        run_to_end(loaded, RunRequest.build("greedy", {}, "Hello", max_new_tokens=4))
    with pytest.raises(ValueError, match="turn them off for a diffusion strategy"):
        run_to_end(loaded, RunRequest.build("diffusion", {}, "Hello", max_new_tokens=4, lens=True))


def test_bidirectional_attention_on_a_causal_lm_lets_later_positions_count(tiny):
    """With the all-visible mask, what sits after a position changes its prediction; causally it cannot."""
    canvas = list(range(10, 30))
    changed = list(canvas)
    changed[-1] = 5
    causal = tiny.canvas_logits(canvas), tiny.canvas_logits(changed)
    both = tiny.canvas_logits(canvas, bidirectional=True), tiny.canvas_logits(changed, bidirectional=True)
    assert torch.allclose(causal[0][:-1], causal[1][:-1])
    assert not torch.allclose(both[0][5], both[1][5])


def test_the_unmasking_record_round_trips_through_the_store_and_parquet(tiny, store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    trace = run_to_end(tiny, RunRequest.build("prophet", {"block_length": 8}, PROMPT, max_new_tokens=16, chat=False),
                       recorder=Recorder(store))
    assert store.load_trace(trace.run_id) == trace
    out = tmp_path / "unmask.parquet"
    assert main(["export", trace.run_id, "--format", "unmask", "--out", str(out), "--db", str(store.url)]) == 0
    rows = pq.read_table(out).to_pylist()
    steps = unmask_steps(trace)
    assert len(rows) == sum(len(s.masked) for s in steps)
    assert sorted(r["position"] for r in rows if r["committed"]) == list(range(16))
    first = steps[0]
    assert [r["confidence"] for r in rows if r["step"] == 0] == first.confidences


def test_the_diffusion_views_draw_the_unmasking_order_and_replay(tiny):
    from viz.catalog import get_view
    from viz.diffusion import commits
    from viz.theme import has_data

    traces = [run_to_end(tiny, RunRequest.build("diffusion", {"block_length": 8, "steps": 8}, PROMPT,
                                                max_new_tokens=16, chat=False)),
              run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=16, chat=False))]
    found = commits(traces[0])
    steps = unmask_steps(traces[0])
    assert sorted(found) == list(range(16))
    assert all(found[p].step == s.step for s in steps for p in s.committed)
    order = get_view("unmasking-order").render(traces, 1)  # lane 2 is greedy: the view falls back to lane 1
    heat = order.data[0]
    assert heat.z[0][0] is None or heat.z[0][0] == 0
    assert [row.count(None) for row in heat.z] == [16 - sum(len(s.committed) for s in steps[:k + 1])
                                                  for k in range(len(steps))]  # each row is the canvas then
    replay = get_view("unmasking-replay").render(traces, 0)
    assert len(replay.frames) == len(steps) and replay.data[0].text.count("▒") == 0
    assert replay.frames[0].data[0].text.count("▒") == 16 - len(steps[0].committed)
    assert has_data(get_view("unmasking-commits").render(traces, 0))
    assert not has_data(get_view("unmasking-order").render(traces[1:], 0))


def test_adablock_ends_a_block_after_a_confident_delimiter():
    from explorer.strategies.adablock import adaptive_block_end, delimiter_ids
    from explorer.testing import tiny_tokenizer

    newline = delimiter_ids(tiny_tokenizer(), "\\n .")
    tokenizer = tiny_tokenizer()
    assert newline == {tokenizer.convert_tokens_to_ids("\n"), tokenizer.convert_tokens_to_ids(".")}
    nl = tokenizer.convert_tokens_to_ids("\n")
    rows = torch.tensor([4, 5, 6, 7, 30])
    proposals = torch.tensor([9, nl, 9, nl, nl])
    probs = torch.full((5, 100), 0.001, dtype=torch.float64)
    probs[1, nl], probs[3, nl], probs[4, nl] = 0.35, 0.6, 0.99  # the one at 30 is outside the window
    assert adaptive_block_end(4, 36, 40, 0.25, rows, proposals, probs, newline, 0.3) == 8  # after position 7
    assert adaptive_block_end(4, 36, 40, 0.25, rows, proposals, probs, newline, 0.7) == 36  # none clears τ_d
    assert adaptive_block_end(4, 36, 40, 0.25, rows, proposals, probs, set(), 0.0) == 36


def test_eoser_scales_eos_early_and_ass_commits_powers_of_two(tiny):
    from explorer.strategies.eoser import EoserConfig, ascending_counts, eos_factor

    assert ascending_counts(10) == [1, 2, 7] and ascending_counts(127) == [1, 2, 4, 8, 16, 32, 64]
    assert sum(ascending_counts(1000)) == 1000
    linear = EoserConfig(ascending=False)
    assert eos_factor(linear, 0, 5) == pytest.approx(0.4) and eos_factor(linear, 4, 5) == pytest.approx(1.0)
    ass = EoserConfig()
    assert eos_factor(ass, 0, 7) == pytest.approx(0.01 + 0.99 / 128)  # t = (2^(i+1) - 1) / 2^S
    assert eos_factor(ass, 6, 7) == pytest.approx(0.01 + 0.99 * 127 / 128)
    trace = run_to_end(tiny, RunRequest.build("eoser", {}, PROMPT, max_new_tokens=24, chat=False))
    assert [len(s.committed) for s in unmask_steps(trace)] == ascending_counts(24)
    assert trace.finished.target_forward_passes == len(ascending_counts(24))  # about log2(L) passes


@pytest.mark.parametrize("cache", ["prefix", "dual", "dkv"])
def test_kv_reuse_is_exact_under_causal_attention_and_recomputes_less(tiny, cache):
    """With causal attention a position's K/V depends only on what precedes it, so Fast-dLLM's prefix and dual
    caches (and dKV-Cache, left to right) change nothing but the work: each step recomputes only its share."""
    params = {"block_length": 8}
    plain = run_to_end(tiny, RunRequest.build("diffusion", params, PROMPT, max_new_tokens=24, chat=False))
    cached = run_to_end(tiny, RunRequest.build("diffusion", {**params, "cache": cache}, PROMPT, max_new_tokens=24,
                                               chat=False))
    assert cached.token_ids == plain.token_ids
    assert [s.logprob for s in cached.token_steps] == pytest.approx([s.logprob for s in plain.token_steps], abs=1e-4)
    steps = unmask_steps(cached)
    assert sum(len(s.recomputed) for s in steps) < sum(len(s.recomputed) for s in unmask_steps(plain)) == 24 * 24
    for step in steps:
        opens = step.step == 0 or step.block_start != steps[step.step - 1].block_start
        block_step = sum(1 for s in steps[:step.step] if s.block_start == step.block_start)
        if cache == "dual" and not opens:
            assert step.recomputed == list(range(step.block_start, step.block_end))
        if cache == "prefix" and not opens:
            assert step.recomputed == list(range(step.block_start, 24))
        if cache == "dkv" and block_step < 2:  # rebuilt when a block opens (and its step 1, as the authors')
            assert step.recomputed == list(range(24))
        elif cache == "dkv":
            assert set(step.recomputed) == set(step.masked) | set(steps[step.step - 1].committed)


def test_delayed_caching_left_to_right_is_greedy_and_reuse_is_refused_where_it_cannot_work(tiny, masked_lm):
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=16, chat=False))
    dkv = run_to_end(tiny, RunRequest.build("diffusion", {"block_length": 1, "cache": "dkv"}, PROMPT,
                                            max_new_tokens=16, chat=False))
    assert dkv.token_ids == greedy.token_ids
    both_ways = run_to_end(tiny, RunRequest.build("diffusion", {"cache": "dual", "attention": "bidirectional",
                                                                "block_length": 4}, PROMPT, max_new_tokens=8,
                                                  chat=False))
    assert both_ways.status == "ok" and len(both_ways.token_ids) == 8
    with pytest.raises(ValueError, match="cannot reuse canvas K/V"):
        run_to_end(masked_lm, RunRequest.build("diffusion", {"cache": "prefix"}, "Hi", max_new_tokens=4))
    with pytest.raises(ValueError, match="use cache=none"):
        RunRequest.build("diffusion", {"cache": "dual", "cfg_scale": 1}, "Hi")


def test_localleap_commits_anchors_and_their_confident_neighbours():
    from explorer.strategies.localleap import LocalLeapConfig, LocalLeapSchedule, local_thresholds
    from explorer.strategies.unmasking import StepView

    config = LocalLeapConfig(anchor=0.9, relaxed=0.5, radius=2)
    assert local_thresholds([3, 4, 5, 6, 9], [5], config) == pytest.approx([0.7, 0.5, 0.9, 0.5, 0.9])
    positions = torch.tensor([3, 4, 5, 6, 7, 9, 12])
    scores = torch.tensor([0.65, 0.55, 0.95, 0.4, 0.8, 0.85, 0.99], dtype=torch.float64)
    in_block = torch.tensor([True] * 6 + [False])  # 12 lies outside the block
    view = StepView(0, 0, 1, 0.0, positions, in_block, torch.zeros(7, 4), torch.zeros(7, 4, dtype=torch.float64),
                    torch.zeros(7, dtype=torch.long), scores, 1)
    decision = LocalLeapSchedule(config).decide(view)
    # anchor 5 (0.95); 4 (d=1, 0.55 ≥ 0.5) and 7 (d=2, 0.8 ≥ 0.7) follow it; 3 (d=2, 0.65 < 0.7), 6 (d=1, 0.4),
    # 9 (too far, 0.85 < 0.9) do not; 12 is out of the block
    assert positions[decision.committed].tolist() == [4, 5, 7]
    calm = LocalLeapSchedule(config).decide(StepView(0, 0, 1, 0.0, positions, in_block, view.logits, view.probs,
                                                     view.proposals, scores * 0.5, 1))
    assert positions[calm.committed].tolist() == [5]  # no anchor: the single most confident one


def hub_reachable() -> bool:
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.hub
@pytest.mark.skipif(not hub_reachable(), reason="the Hugging Face Hub cannot be reached from here")
def test_modernbert_chat_diffusion_model_from_the_hub_answers_a_few_prompts():
    from explorer.models import load_model

    model = load_model("dllm-hub/ModernBERT-base-chat-v0.1")
    assert model.diffusion is not None and not model.diffusion.shift
    for prompt in ("What is the capital of France?", "Name three colours.", "Say hello."):
        trace = run_to_end(model, RunRequest.build("diffusion", {"block_length": 16, "steps": 32}, prompt,
                                                   max_new_tokens=32))
        assert trace.status == "ok" and trace.text.strip()


def test_ccd_averages_recent_predictions_and_commits_what_stayed_consistent(tiny):
    from explorer.strategies.ccd import marginal_and_consistency
    from explorer.strategies.unmasking import probs_entropy as entropy

    steady = [torch.tensor([0.7, 0.2, 0.1])] * 3
    mean, information = marginal_and_consistency(steady)
    assert mean.tolist() == pytest.approx([0.7, 0.2, 0.1]) and float(information) == pytest.approx(0.0, abs=1e-9)
    flipping = [torch.tensor([0.9, 0.05, 0.05]), torch.tensor([0.05, 0.9, 0.05])]
    mean, information = marginal_and_consistency(flipping)
    expected = float(entropy(mean) - (entropy(flipping[0].double()) + entropy(flipping[1].double())) / 2)
    assert float(information) == pytest.approx(expected) and float(information) > 0.4  # the context mattered
    trace = run_to_end(tiny, RunRequest.build("ccd", {"block_length": 8}, PROMPT, max_new_tokens=16, chat=False))
    steps = unmask_steps(trace)
    assert sorted(p for s in steps for p in s.committed) == list(range(16))
    for step in steps:  # the recorded consistency of every committed position
        values = [step.scores[step.masked.index(p)] for p in step.committed]
        assert all(v >= -1e-9 for v in values)
        if len(step.committed) > 1:
            assert all(v <= 0.05 + 1e-9 for v in values)
    fixed = run_to_end(tiny, RunRequest.build("ccd", {"block_length": 8, "adaptive": False, "steps": 8}, PROMPT,
                                              max_new_tokens=16, chat=False))
    assert [len(s.committed) for s in unmask_steps(fixed)] == [2] * 8
    with pytest.raises(ValueError, match="history × block_length is 4096"):
        RunRequest.build("ccd", {"history": 8, "block_length": 0}, "Hi")


def test_ete_exploits_the_confident_and_explores_within_its_bit_budget(tiny):
    from explorer.strategies.ete import explore_positions

    bits = [0.1, 3.0, 1.5, 0.5, 1.0]
    entropies = [0.2, 2.5, 2.0, 1.8, 0.4]
    eligible = [True, True, True, True, False]
    assert explore_positions(bits, entropies, eligible, 2.0) == [2, 3]  # 1 costs 3 bits: over budget, skipped
    assert explore_positions(bits, entropies, eligible, 0.0) == []
    trace = run_to_end(tiny, RunRequest.build("ete", {"block_length": 8, "budget": 4}, PROMPT, max_new_tokens=16,
                                              chat=False))
    steps = unmask_steps(trace)
    assert sorted(p for s in steps for p in s.committed) == list(range(16))
    for step in steps:
        committed_bits = {p: step.scores[step.masked.index(p)] for p in step.committed}
        explored = [b for p, b in committed_bits.items() if 2 ** -b < 0.9]  # not confident: explored
        assert len(step.committed) == 1 or sum(explored) <= 4 + 1e-6


def test_an_ar_to_diffusion_checkpoint_is_recognised_by_its_architecture(tmp_path):
    """dllm's A2D models keep their base model type and declare an A2D architecture: loaded as a diffusion LM
    (the tokenizer's mask token, no shift), with remote code only by opt-in (here the base class serves)."""
    import json

    from explorer.models import load_model
    from explorer.testing import tiny_model, tiny_tokenizer

    path = tmp_path / "a2d"
    model, tokenizer = tiny_model(0).model, tiny_tokenizer(mask=True)
    model.resize_token_embeddings(len(tokenizer))  # room for <mask>
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["A2DLlamaLMHeadModel"]}))
    loaded = load_model(str(path))
    assert loaded.diffusion is not None and not loaded.diffusion.shift and loaded.diffusion.bidirectional
    assert loaded.diffusion.mask_id == loaded.tokenizer.mask_token_id
    trace = run_to_end(loaded, RunRequest.build("diffusion", {"block_length": 4}, "Hi", max_new_tokens=8))
    assert trace.status == "ok" and len(trace.token_ids) == 8


def test_ccd_commits_only_the_fallback_before_two_buffered_steps(tiny):
    """On one buffered distribution I = H(p̄) − H(p) is 0 whatever the model said: no position is consistent before
    its buffer holds two steps (the authors' code, too, compares a position's argmax at two steps), so a block's
    first step commits only the one position the adaptive budget always takes, however low τ is."""
    from explorer.strategies.ccd import CcdConfig, CcdSchedule

    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.85, 0.05], [0.6, 0.3, 0.1]],
                         dtype=torch.float64)
    positions, in_block = torch.arange(4), torch.tensor([True, True, True, False])  # 3 lies outside the block

    def view(rows: list[int], block_step: int) -> StepView:
        p = probs[rows]
        return StepView(block_step, block_step, 4, 0.0, positions[rows], in_block[rows], p.log().float(), p,
                        p.argmax(-1), p.max(-1).values, 1)

    schedule = CcdSchedule(CcdConfig(block_length=4, confidence=0.01))
    first = schedule.decide(view([0, 1, 2, 3], 0))
    assert first.committed.tolist() == [True, False, False, False]  # one: the lowest entropy of p̄
    second = schedule.decide(view([1, 2, 3], 1))  # the same predictions again: I = 0 on two steps
    assert second.committed.tolist() == [True, True, False]

    trace = run_to_end(tiny, RunRequest.build("ccd", {"block_length": 8, "confidence": 0.01}, PROMPT,
                                              max_new_tokens=16, chat=False))
    steps = unmask_steps(trace)
    opening = [s for k, s in enumerate(steps) if k == 0 or s.block_start != steps[k - 1].block_start]
    assert [len(s.committed) for s in opening] == [1, 1]  # not the whole block at its first step
    assert sorted(p for s in steps for p in s.committed) == list(range(16))


def test_window_diffusion_zones_follow_the_authors_phases_by_hand():
    """The authors' rule (modeling_llada.py: generate, build_window_plan, update_window_plan): a phase opens with a
    full pass every R steps; then each step recomputes the active tokens (the first W masked, those committed in
    the phase, and for one step those the phase's opening committed) on the stored K/V of the window (the decoded
    positions and the first W + B masked when the phase opened); the masked positions past it are pruned."""
    from explorer.strategies.window_diffusion import WindowConfig, WindowSchedule, zones

    masked = torch.tensor([False, True, True, False, True, True, True, True, True, True])
    assert zones(masked, 2, 3) == ([1, 2], [4, 5, 6], [7, 8, 9])
    schedule = WindowSchedule(WindowConfig(window=2, buffer=3, refresh=4))
    assert schedule.recompute(4, 0, 10, masked, [0, 3], block_step=4) is None  # a phase opens: full pass
    # step 5: the opening (step 4) committed 0 and 3: active 1, 2 and (once) 0, 3; window 1 2 4 5 6; far 7 8 9
    assert schedule.recompute(5, 0, 10, masked, [0, 3], block_step=5) == ([0, 1, 2, 3], [4, 5, 6])
    masked[1] = False  # step 5 committed 1: it stays active; 0 and 3 are cached; the window does not move
    assert schedule.recompute(6, 0, 10, masked, [1], block_step=6) == ([1, 2, 4], [0, 3, 5, 6])
    masked[4] = False
    assert schedule.recompute(7, 0, 10, masked, [4], block_step=7) == ([1, 2, 4, 5], [0, 3, 6])
    assert schedule.recompute(8, 0, 10, masked, [5], block_step=8) is None


def test_window_diffusion_commits_in_the_open_block_and_runs_on_a_masked_lm(tiny, masked_lm):
    # all-visible attention: positions past the open block can be the most confident ones (not so causally)
    params = {"block_length": 8, "window": 3, "buffer": 4, "refresh": 4, "attention": "bidirectional"}
    trace = run_to_end(tiny, RunRequest.build("window_diffusion", params, PROMPT, max_new_tokens=24, chat=False))
    steps = unmask_steps(trace)
    assert all(s.block_start <= p < s.block_end for s in steps for p in s.committed)
    assert [len(s.committed) for s in steps] == [1] * 24  # LLaDA's fixed count: steps = tokens, one each
    phase: set[int] = set()
    for before, step in zip([None, *steps], steps, strict=False):
        if step.step % 4 == 0:  # a phase opens: everything recomputed, any masked position of the block eligible
            assert step.recomputed == list(range(24))
            phase = set()
            continue
        expected = set(step.masked[:3]) | phase | set(before.committed)
        assert set(step.recomputed) == expected
        assert set(step.committed) <= set(step.masked[:3])  # only the active zone commits
        phase |= set(step.committed)
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=16, chat=False))
    one = run_to_end(tiny, RunRequest.build("window_diffusion", {"block_length": 1, "window": 1, "buffer": 2,
                                                                 "refresh": 3}, PROMPT, max_new_tokens=16,
                                            chat=False))
    assert one.token_ids == greedy.token_ids  # one-position blocks on a causal model: greedy decoding, K/V exact
    defaults = run_to_end(masked_lm, RunRequest.build("window_diffusion", {}, "Hello", max_new_tokens=12))
    assert defaults.status == "ok" and len(defaults.token_ids) == 12
    assert all(s.recomputed == list(range(12)) and "full pass" in s.rule for s in unmask_steps(defaults))
    with pytest.raises(ValueError, match="leave cache=none"):
        RunRequest.build("window_diffusion", {"cache": "dual"}, "Hi")


def test_dkv_cache_decode_rebuilds_when_a_block_opens_and_refreshes_every_8_steps(tiny):
    """The authors' llada_dkv_cache_decode.py: generate: the cache is dropped when a block opens; a block's
    steps 0 and 1 and every step i with i % cache_reloading_step == 0 are full passes (8: their LLaDA setting);
    the others recompute the masked positions and those committed the step before (delayed caching)."""
    from explorer.strategies.unmasking import UnmaskingConfig

    assert UnmaskingConfig().refresh == 8
    params = {"block_length": 16}
    plain = run_to_end(tiny, RunRequest.build("diffusion", params, PROMPT, max_new_tokens=32, chat=False))
    cached = run_to_end(tiny, RunRequest.build("diffusion", {**params, "cache": "dkv"}, PROMPT, max_new_tokens=32,
                                               chat=False))
    assert cached.token_ids == plain.token_ids  # exact under causal attention
    steps = unmask_steps(cached)
    assert [s.step for s in steps if s.recomputed == list(range(32))] == [0, 1, 8, 16, 17, 24]
    for before, step in zip(steps, steps[1:], strict=False):
        if step.step not in (1, 8, 16, 17, 24):
            assert set(step.recomputed) == set(step.masked) | set(before.committed)


def test_dkv_cache_greedy_recomputes_the_next_commits_the_last_ones_and_a_window(tiny, masked_lm):
    """dKV-Cache-Greedy (llada_dkv_cache_greedy.py: generate, find_window_tokens): a random decoding order fixed
    when a block opens; a full pass every R steps of a block; in between only the positions this step commits,
    those the step before committed, and W masked neighbours of each, nearest first, alternating left, right."""
    from explorer.strategies.dkv_cache import greedy_window

    masked = [False, True, True, False, True, True, True, False, True, True]
    assert greedy_window([5], masked, {5}, 3) == [4, 6, 2]
    assert greedy_window([5], masked, {5}, 4) == [4, 6, 2, 8]
    assert greedy_window([2, 5], masked, {2, 5}, 2) == [1, 4, 6, 8]
    assert greedy_window([9], masked, {9}, 9) == [8, 6, 5, 4, 2, 1]  # fewer than W masked: all of them

    params = {"block_length": 8, "refresh": 3, "window": 2}
    trace = run_to_end(tiny, RunRequest.build("dkv_greedy", params, PROMPT, max_new_tokens=16, chat=False, seed=5))
    steps = unmask_steps(trace)
    assert sorted(p for s in steps for p in s.committed) == list(range(16)) and len(steps) == 16
    for k, step in enumerate(steps):
        block_step = k % 8
        if block_step % 3 == 0:
            assert step.recomputed == list(range(16))
            continue
        is_masked = [p in step.masked for p in range(16)]
        taken = set(step.committed) | set(steps[k - 1].committed)
        expected = taken | set(greedy_window(step.committed, is_masked, taken, 2))
        assert set(step.recomputed) == expected
    again = run_to_end(tiny, RunRequest.build("dkv_greedy", params, PROMPT, max_new_tokens=16, chat=False, seed=5))
    assert again.token_ids == trace.token_ids
    with pytest.raises(ValueError, match="remasking must be one of random"):
        RunRequest.build("dkv_greedy", {"remasking": "low_confidence"}, "Hi")
    fallback = run_to_end(masked_lm, RunRequest.build("dkv_greedy", {"block_length": 4}, "Hello", max_new_tokens=8))
    assert fallback.status == "ok" and all(s.recomputed == list(range(8)) for s in unmask_steps(fallback))


# ------------------------------------------------------------------ caches on bidirectional models, cache drift
def drift_records(trace) -> list:
    return [e for e in trace.events if e.kind == "cache_drift"]


def canvases(trace, mask_id: int) -> list[list[int]]:
    """The canvas (prompt ‖ generated) as each recorded step found it, rebuilt from the commits before it."""
    prompt, steps = trace.started.prompt_ids, unmask_steps(trace)
    generated = [mask_id] * (max(max(s.masked) for s in steps) + 1)
    found = []
    for step in steps:
        found.append([*prompt, *generated])
        for position, token in zip(step.committed, step.committed_ids, strict=True):
            generated[position] = token
    return found


def fast_dllm_pass(lm, opened: list[int], now: list[int], first: int, last: int, dual: bool) -> torch.Tensor:
    """The authors' cached pass, written as NVlabs/Fast-dLLM llada/generate.py writes it, on the model's own
    attention (all-visible for an A2D model) and HF's own cache: a full pass over the canvas as the block
    [first, last) opened (absolute positions) keeps its K/V; generate_with_prefix_cache truncates them to the
    prefix and runs x[:, first:]; generate_with_dual_cache keeps the prefix and the suffix and runs the block only.
    Logits `(recomputed, vocab)` from position `first` on."""
    from transformers import DynamicCache

    model = lm.model
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([opened]), past_key_values=cache, use_cache=True)
        kept = torch.tensor([*range(first), *(range(last, len(now)) if dual else ())])
        reused = DynamicCache(config=model.config)  # the prefix's K/V (past_key_values[:, :, :first]), dual: + suffix
        for index, layer in enumerate(cache.layers):
            reused.update(layer.keys.index_select(2, kept), layer.values.index_select(2, kept), index)
        end = last if dual else len(now)
        return model(input_ids=torch.tensor([now[first:end]]), position_ids=torch.arange(first, end)[None],
                     past_key_values=reused, use_cache=True).logits[0]


@pytest.fixture(scope="module")
def a2d():
    from explorer.testing import tiny_a2d_model

    return tiny_a2d_model(0)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fast_dllm_caches_on_a_bidirectional_model_are_the_authors_approximation(a2d, cache):
    """On an AR-to-diffusion model (all-visible attention) every step's logits are those of the authors' cached pass:
    equal to a full pass when the block opens, and later computed on the prefix's (and, dual, the suffix's) K/V from
    the block's opening, which are stale by design: they attended to the block while it was still masked. So the
    cached steps differ from a full pass, unlike under causal attention."""
    trace = run_to_end(a2d, RunRequest.build("diffusion", {"block_length": 8, "cache": cache, "drift_every": 1},
                                             PROMPT, max_new_tokens=16, chat=False))
    steps, start = unmask_steps(trace), len(trace.started.prompt_ids)
    mask_id = a2d.canvas_info().mask_id
    opened: list[int] = []
    for step, now in zip(steps, canvases(trace, mask_id), strict=True):
        first, last = start + step.block_start, start + step.block_end
        opens = step.step == 0 or step.block_start != steps[step.step - 1].block_start
        if opens:
            opened = now
            reference = a2d.canvas_logits(now)[first:]  # a full pass over the canvas
        else:
            reference = fast_dllm_pass(a2d, opened, now, first, last, cache == "dual")
        probs = torch.softmax(reference.double(), dim=-1)  # row r: absolute position first + r
        compared = [p for p in step.masked if step.block_start <= p < (step.block_end if cache == "dual" else 16)]
        rows = [start + p - first for p in compared]
        assert [step.predicted_ids[step.masked.index(p)] for p in compared] == probs[rows].argmax(-1).tolist()
        assert [step.confidences[step.masked.index(p)] for p in compared] == pytest.approx(
            probs[rows].max(-1).values.tolist(), abs=1e-5)
        assert step.recomputed == (list(range(16)) if opens else list(range(step.block_start, 16 if cache == "prefix"
                                                                             else step.block_end)))
    drifts = drift_records(trace)
    assert [d.step for d in drifts] == [s.step for s in steps]
    # a full pass only when a block opens (at block 0 a cached step recomputes every generated position too, on
    # the prompt's stale K/V)
    assert [d.step for d in drifts if d.full_pass] == [0, 8]
    assert all(d.max_logit_difference <= 1e-4 for d in drifts if d.full_pass)  # the block's first step: exact
    assert all(d.max_logit_difference > 1e-3 for d in drifts if not d.full_pass)  # stale K/V: approximate
    assert trace.finished.target_forward_passes == len(steps)  # the drift passes are not the method's work


@pytest.mark.parametrize("cache", ["prefix", "dual", "dkv"])
def test_caches_on_a_one_layer_bidirectional_model_are_exact(cache):
    """Where the papers say a reused K/V may differ: a position's layer-1 K/V depend only on its own token and
    position, so a one-layer model's reused K/V are never stale (the tokens of the prefix, and of the suffix's
    masks, do not change while a block denoises): the cache drift is zero at every step. The drift of a deeper
    model (the test above) comes only from layers that attended to positions whose tokens changed since."""
    from explorer.testing import tiny_a2d_model

    shallow = tiny_a2d_model(0, layers=1)
    params = {"block_length": 8, "cache": cache, "drift_every": 1, "refresh": 3}
    trace = run_to_end(shallow, RunRequest.build("diffusion", params, PROMPT, max_new_tokens=16, chat=False))
    drifts = drift_records(trace)
    assert len(drifts) == len(unmask_steps(trace)) and not all(d.full_pass for d in drifts)
    assert all(d.max_logit_difference <= 1e-4 and d.cached_ids == d.full_ids for d in drifts)
    plain = run_to_end(shallow, RunRequest.build("diffusion", {"block_length": 8}, PROMPT, max_new_tokens=16,
                                                 chat=False))
    assert trace.token_ids == plain.token_ids


def test_dkv_cache_decode_on_a_bidirectional_model_drifts_between_refreshes_and_a_refresh_resets_it(a2d):
    """dKV-Cache-Decode run bidirectionally: a decoded position's K/V is cached one step late and goes stale as
    other positions are decoded; a block's steps 0 and 1 and every step i with i % refresh == 0 are full passes,
    at which the drift record shows no difference at all."""
    params = {"block_length": 8, "cache": "dkv", "refresh": 3, "drift_every": 1}
    trace = run_to_end(a2d, RunRequest.build("diffusion", params, PROMPT, max_new_tokens=16, chat=False))
    steps, drifts = unmask_steps(trace), drift_records(trace)
    refreshes = [k for k in range(16) if k % 8 < 2 or (k % 8) % 3 == 0]
    assert [d.step for d in drifts if d.full_pass] == refreshes == [s.step for s in steps
                                                                    if s.recomputed == list(range(16))]
    for record in drifts:
        if record.full_pass:
            assert record.cached_ids == record.full_ids and record.max_logit_difference <= 1e-4
            assert record.cached_confidences == pytest.approx(record.full_confidences, abs=1e-5)
    assert max(d.max_logit_difference for d in drifts if not d.full_pass) > 1e-3
    every_other = run_to_end(a2d, RunRequest.build("diffusion", {**params, "drift_every": 2}, PROMPT,
                                                   max_new_tokens=16, chat=False))
    assert [d.step for d in drift_records(every_other)] == list(range(0, 16, 2))
    assert every_other.token_ids == trace.token_ids  # the drift pass changes nothing that is committed


def test_drift_is_zero_under_causal_attention_and_reuse_is_refused_in_one_line_where_impossible(tiny, masked_lm):
    params = {"block_length": 8, "cache": "dual", "drift_every": 1}
    trace = run_to_end(tiny, RunRequest.build("diffusion", params, PROMPT, max_new_tokens=16, chat=False))
    drifts = drift_records(trace)
    assert len(drifts) == 16 and all(d.max_logit_difference <= 1e-4 and d.cached_ids == d.full_ids for d in drifts)
    nothing = run_to_end(tiny, RunRequest.build("diffusion", {"drift_every": 1}, PROMPT, max_new_tokens=8,
                                                chat=False))
    assert not drift_records(nothing)  # no K/V reused: nothing to compare
    with pytest.raises(ValueError, match="cannot reuse canvas K/V") as refused:
        run_to_end(masked_lm, RunRequest.build("diffusion", {"cache": "dual"}, "Hi", max_new_tokens=4))
    message = str(refused.value)
    assert "\n" not in message and "no KV cache" in message and "attention=bidirectional" in message


def test_the_cache_drift_view_draws_each_recorded_step(a2d, tiny, store):
    from viz.catalog import get_view
    from viz.theme import has_data

    params = {"block_length": 8, "cache": "dkv", "refresh": 3, "drift_every": 1}
    trace = run_to_end(a2d, RunRequest.build("diffusion", params, PROMPT, max_new_tokens=16, chat=False),
                       recorder=Recorder(store))
    assert store.load_trace(trace.run_id) == trace  # the CacheDrift records round-trip
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=8, chat=False))
    figure = get_view("cache-drift").render([greedy, trace], 0)  # lane 1 has no drift: the view falls back
    drifts = drift_records(trace)
    cached, refresh = figure.data[0], figure.data[1]
    assert list(cached.x) == [d.step for d in drifts]
    assert list(cached.y) == pytest.approx([sum(c != f for c, f in zip(d.cached_ids, d.full_ids, strict=True))
                                            / len(d.positions) for d in drifts])
    confidence = figure.data[2]
    assert list(confidence.y) == pytest.approx([sum(abs(c - f) for c, f in zip(
        d.cached_confidences, d.full_confidences, strict=True)) / len(d.positions) for d in drifts])
    assert list(refresh.x) == [d.step for d in drifts if d.full_pass] and max(confidence.y) > 0
    assert all("block [" in text for text in cached.hovertext)
    assert figure.layout.xaxis2.title.text == "denoising step" and figure.layout.yaxis.title.text
    assert not has_data(get_view("cache-drift").render([greedy], 0))


DIFFUSION_STRATEGIES = sorted(name for name, spec in __import__("explorer.strategies", fromlist=["REGISTRY"])
                              .REGISTRY.items() if spec.family == "diffusion")


@pytest.mark.parametrize("name", DIFFUSION_STRATEGIES)
def test_every_diffusion_strategy_runs_with_its_defaults_on_a_masked_lm_and_an_a2d_model(name, masked_lm):
    """Each diffusion strategy, with its own default settings, on the two kinds of diffusion LM we can build here:
    a masked LM (bidirectional, no KV cache API) and an AR-to-diffusion model (a causal architecture read
    bidirectionally); each run finishes, commits tokens and records its steps as a diffusion LM's run."""
    from explorer.testing import tiny_a2d_model

    for lm in (masked_lm, tiny_a2d_model(0)):
        trace = run_to_end(lm, RunRequest.build(name, {}, "Hello", max_new_tokens=8, chat=False))
        assert trace.finished.status == "ok", (name, lm.info.model_id, trace.finished.error)
        assert 1 <= len(trace.token_ids) <= 8 and trace.started.tags["canvas"] == "diffusion LM"
        assert any(e.kind == "unmask_step" for e in trace.events), (name, lm.info.model_id)
