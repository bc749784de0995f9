"""Search strategies: beam search equals transformers' on the same model; the claims of diverse beam,
contrastive, momentum and cautious decoding; the recorded beam tree."""

import pytest
import torch

from explorer.events import BeamResult, BeamStep, CandidateStep, TrialBranch
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import make_config
from explorer.strategies.cautious import PUNCTUATION, CautiousConfig, trial_count
from explorer.strategies.momentum import NgramGraph
from explorer.testing import tiny_model


def hf_beam(lm, prompt_ids, new_tokens, beams, length_penalty=1.0, early_stopping=False, num_return=1):
    ids = torch.tensor([prompt_ids])
    early = {"false": False, "true": True, "never": "never"}.get(early_stopping, early_stopping)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=beams,
                            max_new_tokens=new_tokens, length_penalty=length_penalty, early_stopping=early,
                            num_return_sequences=num_return, output_scores=True, return_dict_in_generate=True,
                            pad_token_id=lm.tokenizer.pad_token_id)
    return out.sequences[:, len(prompt_ids):].tolist(), out.sequences_scores.tolist()


def assert_same_as_hf(lm, prompt, new_tokens, beams, length_penalty, early_stopping, chat=False):
    config = make_config("beam", {"num_beams": beams, "length_penalty": length_penalty,
                                  "early_stopping": early_stopping, "num_return": beams})
    trace = run_to_end(lm, RunRequest("beam", config, prompt, chat=chat, max_new_tokens=new_tokens))
    result = next(e for e in trace.events if isinstance(e, BeamResult))
    sequences, scores = hf_beam(lm, trace.started.prompt_ids, new_tokens, beams, length_penalty, early_stopping,
                                beams)
    pad = lm.tokenizer.pad_token_id
    for ours, theirs in zip(result.hypotheses, sequences, strict=True):
        assert theirs[:len(ours)] == ours
        assert all(t == pad for t in theirs[len(ours):])
    assert result.scores == pytest.approx(scores, abs=1e-4)
    assert trace.token_ids == result.hypotheses[0]
    return trace


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beams, length_penalty, early_stopping", [
    (2, 1.0, "false"), (4, 1.0, "false"), (3, 0.0, "true"), (4, 2.0, "never"), (4, -0.5, "false"),
])
def test_beam_matches_transformers_on_tiny_models(seed, beams, length_penalty, early_stopping):
    lm = tiny_model(seed, scale=1.5 + seed)
    eos = lm.tokenizer.eos_token_id
    with torch.no_grad():  # make EOS likely so that hypotheses finish at different lengths
        lm.model.lm_head.weight[eos] = lm.model.lm_head.weight[:10].mean(0) * 4
    for prompt in ("Hello", "The cat sat"):
        assert_same_as_hf(lm, prompt, 12, beams, length_penalty, early_stopping)


def test_beam_runs_batched_one_pass_per_step(tiny):
    trace = run_to_end(tiny, RunRequest.build("beam", {"num_beams": 4}, "abc", max_new_tokens=10))
    steps = [e for e in trace.events if isinstance(e, BeamStep)]
    assert trace.finished.target_forward_passes == len(steps)  # prefill + one batched pass per later step


def test_every_hypothesis_is_a_root_to_leaf_path_in_the_tree(tiny_flat):
    trace = run_to_end(tiny_flat, RunRequest.build("beam", {"num_beams": 3, "num_return": 3}, "Hi there",
                       max_new_tokens=8))
    steps = {e.step: e for e in trace.events if isinstance(e, BeamStep)}
    result = next(e for e in trace.events if isinstance(e, BeamResult))
    assert len(result.hypotheses) == 3
    for tokens, end_step, end_candidate in zip(result.hypotheses, result.end_steps, result.end_candidates,
                                                strict=True):
        step = steps[end_step]
        assert step.statuses[end_candidate] == "finished"
        path = [step.tokens[end_candidate]]
        parent = step.parents[end_candidate]
        for s in range(end_step - 1, -1, -1):
            kept = steps[s]
            index = kept.slots.index(parent)
            assert kept.statuses[index] == "kept"
            path.append(kept.tokens[index])
            parent = kept.parents[index]
        assert path[::-1] == tokens


def group_hypotheses(trace, group):
    result = next(e for e in trace.events if isinstance(e, BeamResult))
    return [h for h, g in zip(result.hypotheses, result.groups, strict=True) if g == group]


def test_diverse_beam_without_penalty_is_independent_beam_searches(tiny_flat):
    single = run_to_end(tiny_flat, RunRequest.build("beam", {"num_beams": 2, "num_return": 2}, "Hello",
                        max_new_tokens=8))
    config = make_config("diverse_beam", {"num_beams": 4, "groups": 2, "diversity": 0.0, "num_return": 4})
    diverse = run_to_end(tiny_flat, RunRequest("diverse_beam", config, "Hello", max_new_tokens=8))
    expected = next(e for e in single.events if isinstance(e, BeamResult)).hypotheses
    assert group_hypotheses(diverse, 0) == expected
    assert group_hypotheses(diverse, 1) == expected


def test_diverse_beam_penalty_makes_groups_differ(tiny_flat):
    config = make_config("diverse_beam", {"num_beams": 4, "groups": 2, "diversity": 3.0, "num_return": 4})
    trace = run_to_end(tiny_flat, RunRequest("diverse_beam", config, "Hello", max_new_tokens=8))
    first = [e for e in trace.events if isinstance(e, BeamStep) and e.step == 0]
    kept = [{t for t, s in zip(e.tokens, e.statuses, strict=True) if s == "kept"} for e in first]
    assert kept[0].isdisjoint(kept[1])  # group 2 avoids what group 1 took at the same step
    assert group_hypotheses(trace, 0) != group_hypotheses(trace, 1)
    with pytest.raises(ValueError, match="groups must divide"):
        make_config("diverse_beam", {"num_beams": 4, "groups": 3})


def test_diverse_beam_n_best_reports_plain_model_logprobs(tiny_flat):
    config = make_config("diverse_beam", {"num_beams": 4, "groups": 2, "diversity": 3.0, "num_return": 4,
                                          "length_penalty": 0.0})
    trace = run_to_end(tiny_flat, RunRequest("diverse_beam", config, "Hello", max_new_tokens=6))
    result = next(e for e in trace.events if isinstance(e, BeamResult))
    prompt = trace.started.prompt_ids
    for hypothesis, logprob, score, group in zip(result.hypotheses, result.logprobs, result.scores, result.groups,
                                                 strict=True):
        logits = tiny_flat.session().forward([*prompt, *hypothesis]).logits  # teacher-forced: (n, vocab)
        logp = torch.log_softmax(logits.double(), dim=-1)
        expected = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(hypothesis))
        assert logprob == pytest.approx(expected, abs=1e-4)
        if group == 0:
            assert score == pytest.approx(logprob, abs=1e-4)  # the first group carries no diversity term
    for score, logprob in zip(result.scores, result.logprobs, strict=True):
        assert score <= logprob + 1e-4  # the objective only ever subtracts the (non-negative) diversity term
    small = make_config("diverse_beam", {"num_beams": 4, "groups": 2, "diversity": 0.05, "num_return": 4,
                                         "length_penalty": 0.0})
    overlapping = run_to_end(tiny_flat, RunRequest("diverse_beam", small, "Hello", max_new_tokens=6))
    result = next(e for e in overlapping.events if isinstance(e, BeamResult))
    assert any(score < logprob - 1e-3 for score, group, logprob in
               zip(result.scores, result.groups, result.logprobs, strict=True) if group == 1)  # a paid penalty


def reference_contrastive(lm, prompt, k, alpha, steps):
    """Su et al. 2022 Eq. 5 written out with no cache and no tree: every candidate's hidden state comes from a
    fresh forward pass over the whole sequence."""
    tokens = list(prompt)
    for _ in range(steps):
        out = lm.session().forward(tokens, hidden_states=True)
        logits, hidden = out.logits, out.hidden
        probs = torch.softmax(logits[-1].double(), dim=-1)
        top_p, top_ids = torch.topk(probs, k)
        context = hidden[-1].double()  # (t, hidden): the last layer's states of x_<t
        best, best_score = None, -float("inf")
        for p, v in zip(top_p.tolist(), top_ids.tolist(), strict=True):
            h_v = lm.session().forward([*tokens, v], hidden_states=True).hidden[-1][-1].double()
            similarity = max(float(torch.nn.functional.cosine_similarity(h_v, h_j, dim=0)) for h_j in context)
            score = (1 - alpha) * p - alpha * similarity
            if score > best_score:
                best, best_score = v, score
        tokens.append(best)
    return tokens[len(prompt):]


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
def test_contrastive_matches_a_reference_written_from_the_equation(tiny_flat, alpha):
    trace = run_to_end(tiny_flat, RunRequest.build("contrastive", {"alpha": alpha, "top_k": 4}, "Hello world",
                                                   max_new_tokens=12, chat=False))
    reference = reference_contrastive(tiny_flat, trace.started.prompt_ids, 4, alpha, 12)
    assert len(trace.token_ids) >= 3 and trace.token_ids == reference[:len(trace.token_ids)]  # (EOS may end ours)


def test_contrastive_with_alpha_zero_is_greedy_and_scores_are_recorded(tiny):
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, "Hello world", max_new_tokens=25))
    plain = run_to_end(tiny, RunRequest.build("contrastive", {"alpha": 0.0}, "Hello world",
                       max_new_tokens=25))
    assert plain.token_ids == greedy.token_ids
    trace = run_to_end(tiny, RunRequest.build("contrastive", {"alpha": 0.6, "top_k": 4}, "Hello world",
                       max_new_tokens=25))
    steps = [e for e in trace.events if isinstance(e, CandidateStep)]
    assert len(steps) == 25
    for step, token in zip(steps, trace.token_ids, strict=True):
        assert step.tokens[step.chosen] == token
        assert step.chosen == max(range(len(step.scores)), key=step.scores.__getitem__)
        for p, pen, score, sim in zip(step.probs, step.penalties, step.scores, step.features, strict=True):
            assert score == pytest.approx(0.4 * p - pen, abs=1e-6) and pen == pytest.approx(0.6 * sim, abs=1e-6)
            assert -1.0 - 1e-5 <= sim <= 1.0 + 1e-5
    assert trace.token_ids != greedy.token_ids  # the penalty changes the output here


def test_momentum_alpha_zero_is_greedy_and_resistance_breaks_loops(tiny):
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, "ab", max_new_tokens=40))
    zero = run_to_end(tiny, RunRequest.build("momentum", {"alpha": 0.0}, "ab", max_new_tokens=40))
    assert zero.token_ids == greedy.token_ids
    config = make_config("momentum", {"alpha": 2.0, "resistance": "linear", "free_length": 2, "top_k": 8})
    trace = run_to_end(tiny, RunRequest("momentum", config, "ab", max_new_tokens=40))
    for step in (e for e in trace.events if isinstance(e, CandidateStep)):
        if any(length <= 2 for length in step.features):
            assert step.features[step.chosen] <= 2  # a loop longer than free_length is never closed
    loops = [int(e.features[e.chosen]) for e in trace.events if isinstance(e, CandidateStep)]
    greedy_graph = NgramGraph([], 6)
    greedy_loops = []
    for token in greedy.started.prompt_ids + greedy.token_ids:
        greedy_loops.append(greedy_graph.loop_length(token))
        greedy_graph.add(token)
    assert max(greedy_loops) > 2 and max(loops) <= 2  # greedy loops; momentum does not


def test_momentum_default_is_the_authors_lookup_table(tiny):
    from explorer.strategies.momentum import MomentumConfig, resistance

    config = MomentumConfig()
    assert (config.alpha, config.max_ngram, config.resistance) == (0.2, 5, "table")
    assert [resistance(n, config) for n in range(7)] == [0.0, 1.0, 3.0, 4.0, 5.0, 6.0, float("inf")]
    trace = run_to_end(tiny, RunRequest.build("momentum", {"top_k": 8}, "ab", max_new_tokens=30))
    for step in (e for e in trace.events if isinstance(e, CandidateStep)):
        for length, penalty in zip(step.features, step.penalties, strict=True):
            assert penalty == pytest.approx(0.2 * [0, 1, 3, 4, 5, 6][int(length)])


def test_ngram_graph_loop_length():
    graph = NgramGraph([1, 2, 3, 1, 2], 4)
    assert graph.loop_length(3) == 3  # "1 2 3" seen
    assert graph.loop_length(9) == 0  # a new node
    assert graph.loop_length(1) == 1  # seen, but "2 1" never was


def test_cautious_with_no_trigger_is_plain_sampling(tiny_flat):
    sampled = run_to_end(tiny_flat, RunRequest.build("sample", {"temperature": 0.9}, "Hi", max_new_tokens=20,
                         seed=4))
    cautious = run_to_end(tiny_flat, RunRequest.build("cautious", {"h_min": 9.0, "h_max": 10.0, "temperature": 0.9},
                          "Hi", max_new_tokens=20, seed=4))
    assert cautious.token_ids == sampled.token_ids


def test_cautious_branches_and_keeps_the_lowest_perplexity_trial(tiny_flat):
    config = make_config("cautious", {"h_min": 0.1, "h_max": 1.0, "n_max": 4, "max_trial_tokens": 6})
    trace = run_to_end(tiny_flat, RunRequest("cautious", config, "Hi", max_new_tokens=30, seed=2))
    branches = [e for e in trace.events if isinstance(e, TrialBranch)]
    assert branches
    eos = tiny_flat.eos_token_ids
    for branch in branches:
        assert branch.chosen == min(range(len(branch.perplexities)), key=branch.perplexities.__getitem__)
        assert len(branch.trials) == trial_count(branch.entropy, trace_config(trace))
        for trial in branch.trials:
            last = tiny_flat.piece(trial[-1])
            assert len(trial) == 6 or trial[-1] in eos or any(c in PUNCTUATION for c in last)
        committed = trace.token_ids[branch.step:branch.step + len(branch.trials[branch.chosen])]
        assert committed == branch.trials[branch.chosen][:len(committed)]


def trace_config(trace):
    return CautiousConfig(**trace.started.config)


def test_trial_count_follows_algorithm_1():
    config = CautiousConfig()  # the authors' defaults: H_min 0.01, H_max 1.5, N_max 10
    assert (config.h_min, config.h_max, config.n_max) == (0.01, 1.5, 10)
    # N = max(1, min(N_max, floor((H - H_min) / (H_max - H_min) * N_max))), by hand:
    for h, n in [(0.0, 1), (0.01, 1), (0.3, 1), (0.309, 2), (0.75, 4), (1.2, 7), (1.49, 9), (1.5, 10), (7.0, 10)]:
        assert trial_count(h, config) == n, h



def test_beam_defaults_work_for_any_width(tiny):
    for beams in (1, 2, 3):
        trace = run_to_end(tiny, RunRequest.build("beam", {"num_beams": beams}, "Hi", max_new_tokens=5))
        result = next(e for e in trace.events if isinstance(e, BeamResult))
        assert len(result.hypotheses) == beams  # n-best defaults to one per beam
