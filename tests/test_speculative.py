"""Draft-verify strategies: token-identical to greedy under the greedy rule, exactly the target distribution
under the sampling rule, and the bookkeeping (rounds, acceptance, stop inside a round)."""

import dataclasses
import itertools
import math

import pytest
import torch

from explorer.check import PROMPTS, exact_distribution, greedy_mismatch, total_variation
from explorer.events import DraftRound, TokenStep
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import make_config
from explorer.strategies.acceptance import RejectionSampling, accept_probability, residual
from explorer.strategies.draft_models import ModelDrafter, layer_skip_view, parse_layers
from explorer.strategies.draft_verify import DraftLength, DraftTree, SpeculativeConfig, Verdict, draft_verify
from explorer.strategies.prompt_lookup import find_continuation
from explorer.strategies.self_speculative import clasp_search, most_skippable
from explorer.strategies.speculative import Rollback
from explorer.testing import save_tiny_model, tiny_model
from tests.fakes import FakeLM

GREEDY_RULE_METHODS = [
    ("prompt_lookup", {}),
    ("prompt_lookup", {"min_ngram": 1, "draft_length": 4, "adaptive": False, "backoff": 0}),
    ("jacobi", {"window": 5}),
    ("jacobi", {"window": 4, "variant": "blocks"}),
    ("jacobi", {"window": 3, "variant": "blocks", "init": "copy"}),
    ("speculative", {"draft_model": "target"}),  # the target drafts for itself: everything is accepted
    ("speculative", {}),  # the default: the target with its middle layers skipped
    ("speculative", {"draft_length": 3, "adaptive": False, "fallback_threshold": 0.3}),
    ("self_speculative", {"skip": "1"}),
    ("self_speculative", {}),  # searched skip set: CLaSp's DP after every verification, on the shared cache
    ("self_speculative", {"search": "rank", "search_every": 2}),
    ("self_speculative", {"cache": "separate"}),
    ("spectr", {}),
    ("aded", {}),
    ("aded", {"exploration": 0.0, "budget": 4}),
    ("del", {}),
    ("del", {"confidence": 0.0, "draft_length": 3}),
    ("depth_decay", {}),
    ("depth_decay", {"alpha": 0.5, "adaptive": False}),
    ("spectr", {"drafts": 2, "draft_length": 4, "draft_model": "target"}),
]


@pytest.fixture(scope="module")
def random_drafter_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("drafter") / "m", seed=7, scale=3.0))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, params", GREEDY_RULE_METHODS)
def test_greedy_rule_is_token_identical_to_greedy(seed, name, params):
    """On each of the check's prompts: greedy's tokens, and no round accepts more than it drafted (or marks another
    count of nodes accepted) -- the harness of `python -m explorer check --lossless`."""
    lm = tiny_model(seed, scale=8.0 + 6 * seed)
    assert greedy_mismatch(lm, name, params, PROMPTS, max_new_tokens=40) is None, (name, params)


def test_target_as_its_own_drafter_accepts_everything(tiny):
    params = {"draft_length": 4, "adaptive": False, "draft_model": "target"}
    trace = run_to_end(tiny, RunRequest.build("speculative", params, "Hello", max_new_tokens=40))
    assert all(r.accepted_count == len(r.draft_tokens) == 4 for r in trace.rounds)
    assert trace.mean_accepted_tokens == 5.0  # 8 rounds of 4 accepted drafts + 1 bonus
    assert trace.finished.target_forward_passes == 1 + 8  # prefill + one pass per round


def test_random_drafter_is_still_greedy_and_mostly_rejected(tiny, random_drafter_dir):
    reference = run_to_end(tiny, RunRequest.build("greedy", {}, "Hello world", max_new_tokens=40))
    config = make_config("speculative", {"draft_model": random_drafter_dir, "adaptive": False})
    trace = run_to_end(tiny, RunRequest("speculative", config, "Hello world", max_new_tokens=40))
    assert trace.token_ids == reference.token_ids
    accepted = sum(r.accepted_count for r in trace.rounds)
    drafted = sum(len(r.draft_tokens) for r in trace.rounds)
    assert accepted < 0.3 * drafted
    assert trace.rounds[0].drafter.startswith("draft model")


def test_mismatched_vocabulary_is_a_clear_error(tiny, tmp_path):
    other = tiny_model(3)
    other.tokenizer.add_tokens(["<new>"])
    other.model.resize_token_embeddings(len(other.tokenizer))
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different vocabularies.*speculative. also takes"):
        run_to_end(tiny, RunRequest.build("tree_speculative", {"draft_model": str(tmp_path / "other")},
                   "Hi", max_new_tokens=5))
    # speculative takes it (universal assisted decoding) and stays lossless
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, "Hi", max_new_tokens=12))
    trace = run_to_end(tiny, RunRequest.build("speculative", {"draft_model": str(tmp_path / "other")}, "Hi",
                                              max_new_tokens=12))
    assert trace.token_ids == greedy.token_ids


# --------------------------------------------------------------------------------- the sampling rule
def test_one_step_output_is_exactly_p_for_any_q():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, 0)
        q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, 0)
        accept = accept_probability(p, q)
        # enumerate the drafted token x ~ q: keep x with prob min(1, p/q), else draw from the residual
        output = sum(q[x] * (accept[x] * torch.eye(6, dtype=torch.float64)[x] + (1 - accept[x]) * residual(p, q))
                     for x in range(6))
        torch.testing.assert_close(output, p)
        point = torch.eye(6, dtype=torch.float64)[2]  # a deterministic drafter
        output = p[2] * point + (1 - p[2]) * residual(p, point)
        torch.testing.assert_close(output, p)


def test_verify_one_step_frequencies_match_p_for_a_chain():
    p_logits = torch.tensor([[1.5, 0.2, -0.5, 0.8], [0.0, 0.0, 0.0, 0.0]])
    q = torch.softmax(torch.tensor([-1.0, 1.0, 1.2, 0.0]), 0)
    g = torch.Generator().manual_seed(1)
    config = SpeculativeConfig(rule="sampling")
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        draft = DraftTree.chain([x], [float(q[x])], q.unsqueeze(0))
        verdict = RejectionSampling(config).verify(p_logits, draft, [0], g)
        first = x if verdict.accepted_count else verdict.bonus_token
        counts[first] += 1
    target = torch.softmax(p_logits[0], 0)
    assert 0.5 * (counts / n - target).abs().sum() < 0.015
    assert 0.5 * (q - target).abs().sum() > 0.3  # the draft alone is far from p: the test could fail


def toy_pair():
    """A 3-token target and a very different drafter, both depending on the last token."""
    target_table = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 1.5, 0.5], [0.3, -0.3, 1.0]])
    draft_table = torch.tensor([[-1.0, 1.0, 2.0], [1.0, -1.0, 1.0], [2.0, 0.5, -2.0]])
    target = FakeLM(lambda ctx: target_table[ctx[-1]].clone(), 3)
    draft = FakeLM(lambda ctx: draft_table[ctx[-1]].clone(), 3)
    return target, draft, target_table, draft_table


@pytest.mark.parametrize("gamma", [1, 3])
def test_monte_carlo_joint_distribution_over_three_tokens(gamma):
    target, draft, table, draft_table = toy_pair()
    config = SpeculativeConfig(rule="sampling")
    draft_config = make_config("speculative", {"rule": "sampling", "draft_length": gamma, "adaptive": False})
    counts: dict[tuple[int, ...], int] = {}
    runs = 4000
    for seed in range(runs):
        rng = torch.Generator().manual_seed(seed)
        drafter = ModelDrafter(draft, draft_config, rng, "toy")
        steps = (e for e in draft_verify(target, [0], drafter, config, rng) if isinstance(e, TokenStep))
        key = tuple(s.token_id for s in itertools.islice(steps, 3))
        counts[key] = counts.get(key, 0) + 1
    exact = exact_distribution(lambda seq: torch.softmax(table[seq[-1] if seq else 0], 0), 3)
    drafted = exact_distribution(lambda seq: torch.softmax(draft_table[seq[-1] if seq else 0], 0), 3)
    assert total_variation(counts, exact) < 0.05
    assert 0.5 * sum(abs(drafted[s] - exact[s]) for s in exact) > 0.3


def test_sampling_rule_on_a_tiny_model_runs_and_records_draws(tiny_flat):
    config = make_config("speculative", {"rule": "sampling", "top_p": 0.9, "temperature": 0.8})
    trace = run_to_end(tiny_flat, RunRequest("speculative", config, "Hello", max_new_tokens=30, seed=3))
    again = run_to_end(tiny_flat, RunRequest("speculative", config, "Hello", max_new_tokens=30, seed=3))
    untimed = [dataclasses.replace(e, draft_time_s=0.0, verify_time_s=0.0) if isinstance(e, DraftRound) else e
               for e in trace.events]
    assert untimed == [dataclasses.replace(e, draft_time_s=0.0, verify_time_s=0.0) if isinstance(e, DraftRound)
                       else e for e in again.events]  # same seed, same trace (timings aside)
    for round_ in trace.rounds:
        reached = [u for u, v in zip(round_.u, round_.verdicts, strict=True) if v != "unreached"]
        assert all(u is not None and 0 <= u < 1 for u in reached)
    steps = trace.token_steps
    assert all(s.kept_count < 100 for s in steps)


# ---------------------------------------------------------------------------------------- helpers
def test_stop_inside_a_round_truncates_exactly(tiny):
    params = {"draft_length": 8, "adaptive": False, "draft_model": "target"}
    trace = run_to_end(tiny, RunRequest.build("speculative", params, "Hello", max_new_tokens=6))
    assert len(trace.token_ids) == 6 and trace.finished.stop_reason == "max_new_tokens"
    origins = [s.origin for s in trace.token_steps]
    assert origins[0] == "draft" and set(origins) <= {"draft", "bonus", "plain"}


def test_find_continuation_prefers_long_and_latest_matches():
    context = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    assert find_continuation(context, 3, 1, 4) == ([7, 5, 2, 3], 2, 5)  # "2 3" latest earlier match at 5
    assert find_continuation([1, 2, 3, 4], 3, 1, 4) == ([], 0, -1)
    assert find_continuation([5, 6, 5, 6, 5], 2, 2, 3) == ([6, 5], 2, 1)  # may run into the suffix


def test_draft_length_adapts():
    length = DraftLength(8, True, start=2)
    full = Verdict(2, 0, "bonus", [], [], [], [], [])
    length.update(full, 2)
    assert length.current == 4
    length.update(Verdict(1, 0, "correction", [], [], [], [], []), 4)
    assert length.current == 2
    fixed = DraftLength(5, adaptive=False, start=2)
    fixed.update(full, 5)
    assert fixed.current == 5


def test_layer_skip_view_shares_weights_and_skips(tiny):
    view = layer_skip_view(tiny, {1})
    assert len(view.model.model.layers) == 1 and len(tiny.model.model.layers) == 2
    assert view.model.lm_head.weight is tiny.model.lm_head.weight
    full, skipped = tiny.session().forward([5, 6, 7]).logits, view.session().forward([5, 6, 7]).logits
    assert not torch.allclose(full, skipped)
    torch.testing.assert_close(tiny.session().forward([5, 6, 7]).logits, full)  # the target is untouched
    with pytest.raises(ValueError, match="layer 0 always runs"):
        layer_skip_view(tiny, {0})
    assert parse_layers("3, 5-7") == {3, 5, 6, 7}
    with pytest.raises(ValueError, match="skip must list layers"):
        parse_layers("5-x")


def test_most_skippable_picks_the_layers_that_change_least():
    hidden = torch.randn(7, 4, 16)  # 6 layers
    hidden[3] = hidden[2] * 1.01  # layer 2 barely changes its input
    hidden[5] = hidden[4] + 0.01  # nor does layer 4
    assert most_skippable(hidden, 2) == {2, 4}


def test_clasp_dp_compounds_skips_where_the_per_layer_ranking_cannot():
    # Additive layers f_l(x) = x + d_l on 2-d states: layers 1 and 2 cancel each other, so skipping both leaves
    # the final state exact; the per-layer ranking sees each of them change its input a lot and skips layer 3.
    d = torch.tensor([[1.0, 0.0], [0.0, 5.0], [0.0, -5.0], [0.0, 1.0], [0.0, 0.1]])
    target = torch.cumsum(torch.cat([torch.tensor([[9.0, 0.0]]), d]), dim=0)  # x*_0 .. x*_5

    def run_layer(layer, states):
        return states + d[layer]

    chosen = clasp_search(run_layer, lambda x: x, target, 2)
    assert chosen == {1, 2}
    assert most_skippable(target[:, None, :], 2) != {1, 2}  # the ranking misses it
    assert clasp_search(run_layer, lambda x: x, target, 0) == set()
    assert len(clasp_search(run_layer, lambda x: x, target, 4)) == 4  # every layer but layer 0


def test_clasp_dp_state_is_the_skipped_models_own_hidden_state():
    """The DP's run_layer on the shared cache computes what the layer-skip view computes for that token."""
    lm = tiny_model(2, layers=4)
    session = lm.session()
    session.forward([5, 6, 7, 8])
    view = session.view(layer_skip_view(lm, {2}))
    logits = view.forward([9]).logits[-1]
    decoder = lm.model.model
    state = decoder.embed_tokens(torch.tensor([9]))  # (1, hidden)
    run = session.layer_runner(4)
    for layer in (0, 1, 3):
        state = run(layer, state)
    expected = lm.model.lm_head(decoder.norm(state))[0]
    torch.testing.assert_close(logits, expected.float(), rtol=1e-4, atol=1e-4)
    view.crop(4)
    assert [layer.get_seq_length() for layer in session.cache.layers] == [4, 4, 4, 4]


def test_shared_cache_draft_reads_the_full_models_context():
    """On the shared cache the skipped model's first draft logits differ from a separate cache's (whose context
    K/V come from the skipped model's own hidden states)."""
    lm = tiny_model(2, layers=4)
    skip_view = layer_skip_view(lm, {1, 2})
    shared = lm.session()
    shared.forward([5, 6, 7])
    on_shared = shared.view(skip_view).forward([8]).logits[-1]
    separate = skip_view.session().forward([5, 6, 7, 8]).logits[-1]
    assert not torch.allclose(on_shared, separate, atol=1e-3)


def test_self_speculative_records_the_dp_skip_set_per_round(tiny):
    lm = tiny_model(4, layers=6, scale=8.0)
    trace = run_to_end(lm, RunRequest.build("self_speculative", {"auto_skip": 2}, "abc abd abc", max_new_tokens=30,
                                            chat=False))
    rounds = [e for e in trace.events if isinstance(e, DraftRound)]
    assert rounds and all(len(parse_layers(r.details["skipped_layers"])) == 2 for r in rounds)
    assert 0 not in set().union(*(parse_layers(r.details["skipped_layers"]) for r in rounds))


def test_draft_round_round_trips_through_the_store(store, tiny):
    from explorer.recorder import Recorder

    trace = run_to_end(tiny, RunRequest.build("prompt_lookup", {"min_ngram": 1},
                       "ab ab ab ab ab", max_new_tokens=20), recorder=Recorder(store))
    assert any(isinstance(e, DraftRound) for e in trace.events)
    assert store.load_trace(trace.run_id) == trace


def test_bild_rollback_keeps_tokens_up_to_the_first_distant_one():
    # target log-probabilities of the drafted tokens: -0.1, -0.5, -2.0, -0.1 (and the rows' argmax is token 0)
    logits = torch.full((5, 6), -30.0)
    drafted = [1, 2, 3, 4]
    for row, (token, logp) in enumerate(zip(drafted, [-0.1, -0.5, -2.0, -0.1], strict=True)):
        logits[row, token] = logp
        logits[row, 0] = math.log(max(1e-9, 1 - math.exp(logp)))  # the rest of the mass on token 0
    logits[4, 5] = 0.0
    draft = DraftTree.chain(drafted)
    config = SpeculativeConfig()
    rng = torch.Generator().manual_seed(0)
    verdict = Rollback(1.0, config).verify(logits, draft, [], rng)
    assert verdict.accepted_count == 2 and verdict.node_verdicts == ["accepted", "accepted", "rejected", "unreached"]
    assert verdict.bonus_token == int(logits[2].argmax()) and verdict.bonus_kind == "correction"
    verdict = Rollback(2.5, config).verify(logits, draft, [], rng)  # nothing is far enough
    assert verdict.accepted_count == 4 and verdict.bonus_token == 5 and verdict.bonus_kind == "bonus"
    verdict = Rollback(0.05, config).verify(logits, draft, [], rng)
    assert verdict.accepted_count == 0


def test_bild_rollback_is_lossy_above_ln2_and_exact_below(tiny, random_drafter_dir):
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, "Hello world", max_new_tokens=40, chat=False))
    exact = run_to_end(tiny, RunRequest.build("speculative", {"draft_model": random_drafter_dir, "rollback": 0.6},
                                              "Hello world", max_new_tokens=40, chat=False))
    assert exact.token_ids == greedy.token_ids  # alpha_RB < ln 2: a kept token has p > 1/2, so it is the argmax
    from viz.speculative import round_timeline

    rolled = [r for r in exact.rounds if r.details["rolled_back"] > 0]
    assert rolled  # the random draft is rolled back: marked on the round timeline
    markers = next(t for t in round_timeline(exact).data if t.name == "rollback")
    assert list(markers.x) == [r.round for r in rolled]
    lossy = run_to_end(tiny, RunRequest.build("speculative", {"draft_model": random_drafter_dir, "rollback": 20.0,
                                                              "fallback_threshold": 0.0},
                                              "Hello world", max_new_tokens=40, chat=False))
    assert lossy.token_ids != greedy.token_ids  # the random draft's tokens are kept: BiLD trades quality
    rounds = [e for e in lossy.events if isinstance(e, DraftRound)]
    assert all(r.details["rolled_back"] == 0 for r in rounds)


def test_gs_jacobi_iterates_one_block_at_a_time(tiny):
    window = 4
    trace = run_to_end(tiny, RunRequest.build("jacobi", {"window": window, "variant": "blocks"}, "Hello world",
                                              max_new_tokens=30, chat=False))
    rounds = [e for e in trace.events if isinstance(e, DraftRound)]
    start = rounds[0].position
    pad = tiny.tokenizer.pad_token_id
    assert rounds[0].draft_tokens == [pad] * window  # the paper's initialisation
    for r in rounds:
        block = int(r.details["block"])
        assert block * window <= r.position - start < (block + 1) * window
        assert r.position - start + len(r.draft_tokens) == (block + 1) * window  # never past the block's end
    sliding = run_to_end(tiny, RunRequest.build("jacobi", {"window": window, "init": "copy"}, "Hello world",
                                                max_new_tokens=30, chat=False))
    first = next(e for e in sliding.events if isinstance(e, DraftRound))
    assert first.draft_tokens == [first.draft_tokens[0]] * window and all(
        len(e.draft_tokens) == window for e in sliding.events if isinstance(e, DraftRound))


@pytest.fixture(scope="module")
def retokenised_pair(tmp_path_factory):
    from explorer.testing import save_retokenised_copy

    target = tiny_model(5, scale=10.0)
    return target, str(save_retokenised_copy(target, tmp_path_factory.mktemp("retok") / "draft"))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_draft_with_another_tokenizer_is_lossless_and_aligned(retokenised_pair, prompt):
    target, draft_dir = retokenised_pair
    from explorer.models import load_model

    draft = load_model(draft_dir)
    assert draft.tokenizer.get_vocab() != target.tokenizer.get_vocab()  # another vocabulary, the same texts
    greedy = run_to_end(target, RunRequest.build("greedy", {}, prompt, max_new_tokens=30, chat=False))
    trace = run_to_end(target, RunRequest.build("speculative", {"draft_model": draft_dir}, prompt, max_new_tokens=30,
                                                chat=False))
    assert trace.token_ids == greedy.token_ids
    rounds = [r for r in trace.rounds if r.draft_tokens]
    assert rounds and all(r.details["target_tokens"] == len(r.draft_tokens) for r in rounds)
    for r in rounds:  # the recorded alignment: the draft's text is what the drafted target tokens spell
        assert "".join(r.draft_texts) == r.details["draft_text"][:len("".join(r.draft_texts))]
    accepted = sum(r.accepted_count for r in rounds) / sum(len(r.draft_tokens) for r in rounds)
    assert accepted > 0.9  # the draft computes what the target computes: its re-tokenised drafts are accepted


def test_draft_with_another_tokenizer_is_exact_under_the_sampling_rule(retokenised_pair):
    target, draft_dir = retokenised_pair
    ours = run_to_end(target, RunRequest.build("speculative", {"draft_model": draft_dir, "rule": "sampling"},
                                               "abc", max_new_tokens=12, chat=False, seed=4))
    assert len(ours.token_ids) > 0 and all(r.q == [1.0] * len(r.q) for r in ours.rounds)  # point masses
    with pytest.raises(ValueError, match="target's tokenizer"):
        run_to_end(target, RunRequest.build("speculative", {"draft_model": draft_dir, "rollback": 2.0}, "abc",
                                            max_new_tokens=4, chat=False))
