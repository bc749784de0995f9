"""Issue 19's draft-verify family: SpecTr (K-SEQ selection), ADED, DEL, D^3 and EAD. Exactness on toy
vocabularies, token identity with greedy under the greedy rule, and what each records."""

import itertools
import math

import pytest
import torch

from explorer.check import exact_distribution, total_variation
from explorer.events import DraftRound, TokenStep
from explorer.models import decoder_layers
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import make_config
from explorer.strategies.aded import AdedDrafter, TrigramMatrix, cut, drafts, merge, puct, search
from explorer.strategies.depth_decay import DepthDecayDrafter, decayed_depths, retained_layers
from explorer.strategies.draft_models import load_draft_model
from explorer.strategies.draft_verify import DraftTree, SpeculativeConfig, draft_verify
from explorer.strategies.dynamic_exit import best_exit, tokens_per_layer
from explorer.strategies.ead import next_owner
from explorer.strategies.spectr import (
    SpecTrDrafter,
    TrieSelection,
    group_draws,
    kseq_accept,
    kseq_beta,
    kseq_residual,
    kseq_rho,
    rrs_root_acceptance,
    spectr_acceptance,
)
from explorer.testing import tiny_model
from tests.fakes import FakeLM
from viz.catalog import get_view

PROMPT = "the cat sat on the mat. the cat sat on"


def random_pair(g: torch.Generator, vocab: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, 0)
    q = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, 0)
    return p, q


# ---------------------------------------------------------------------------------------------- SpecTr
@pytest.mark.parametrize("k", [1, 2, 3])
def test_kseq_output_is_exactly_p_by_enumerating_every_draw(k):
    g = torch.Generator().manual_seed(k)
    for _ in range(20):
        p, q = random_pair(g)
        rho = kseq_rho(p, q, k)
        assert 1.0 <= rho <= k
        accept = kseq_accept(p, q, rho)
        left = kseq_residual(p, q, rho, k)
        output = torch.zeros(4, dtype=torch.float64)
        for draws in itertools.product(range(4), repeat=k):  # k i.i.d. draws from q, tested in order
            weight = float(torch.prod(q[list(draws)]))
            none_yet = 1.0
            for x in draws:
                output[x] += weight * none_yet * accept[x]
                none_yet *= 1 - float(accept[x])
            output += weight * none_yet * left
        torch.testing.assert_close(output, p)


def test_kseq_accepts_more_than_one_draft_and_rho_one_is_plain_speculative_sampling():
    g = torch.Generator().manual_seed(3)
    p, q = random_pair(g)
    overlap = float(torch.minimum(p, q).sum())
    assert kseq_rho(p, q, 1) == 1.0 and kseq_beta(p, q, 1.0) == pytest.approx(overlap)
    assert rrs_root_acceptance(p, q, 1) == pytest.approx(overlap)
    beta = kseq_beta(p, q, kseq_rho(p, q, 4))
    assert 1 - (1 - beta) ** 4 > overlap + 0.05  # four drafts are accepted more often than one


def test_kseq_rho_is_the_smallest_valid_rho():
    """SpecTr's K-SEQ (Sun et al. 2023, Algorithm 2) takes rho* in [1, k] solving 1 - (1 - beta(rho))^k =
    rho beta(rho): the smallest rho whose residual is a distribution, hence the largest acceptance 1 - (1 - beta)^k
    (beta falls with rho). A larger rho stays exact but accepts less, so exactness tests cannot tell; pin it."""
    # closed form: p = (1/2, 1/2), q = (1, 0): beta(rho) = 1 / (2 rho) and rho beta = 1/2, so rho* solves
    # (1 - 1 / (2 rho))^k = 1/2: rho* = 1 / (2 (1 - 2^(-1/k)))
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    for k in (2, 3, 4):
        assert kseq_rho(p, q, k) == pytest.approx(1 / (2 * (1 - 2 ** (-1 / k))), abs=1e-9)

    def holds(p, q, k, rho):  # the constraint rho beta >= 1 - (1 - beta)^k, in plain Python
        beta = sum(min(qx, px / rho) for px, qx in zip(p, q, strict=True))
        return rho * beta >= 1 - (1 - beta) ** k

    g = torch.Generator().manual_seed(11)
    for k in (2, 3, 5):
        for _ in range(5):
            p, q = random_pair(g, vocab=5)
            rho = kseq_rho(p, q, k)
            grid = [1 + (k - 1) * i / 20000 for i in range(20001)]  # an independent scan of [1, k]
            smallest = next(r for r in grid if holds(p.tolist(), q.tolist(), k, r))
            assert smallest - (k - 1) / 20000 - 1e-9 <= rho <= smallest + 1e-9
            beta = kseq_beta(p, q, rho)
            assert rho * beta == pytest.approx(1 - (1 - beta) ** k, abs=1e-9)  # equality, not just >=


@pytest.mark.parametrize("mode", ["kseq", "multiset"])
def test_verify_multiset_one_level_frequencies_match_p(mode):
    p_logits = torch.tensor([[1.5, 0.2, -0.5, 0.8]] + [[0.0] * 4] * 3)
    q = torch.softmax(torch.tensor([-1.0, 1.0, 1.2, 0.0]), 0)
    g = torch.Generator().manual_seed(1)
    config = SpeculativeConfig(rule="sampling")
    counts = torch.zeros(4)
    n = 12000
    for _ in range(n):
        grouped = group_draws(torch.multinomial(q, 3, replacement=True, generator=g).tolist())
        tokens = [t for t, _ in grouped]
        draft = DraftTree(tokens, [-1] * len(tokens), [float(q[t]) for t in tokens], q.repeat(len(tokens), 1),
                          mode="multiset", multiplicity=[c for _, c in grouped])
        verdict = TrieSelection(config, mode).verify(p_logits[: len(tokens) + 1], draft, [0], g)
        counts[tokens[verdict.path[0]] if verdict.accepted_count else verdict.bonus_token] += 1
    target = torch.softmax(p_logits[0], 0)
    assert 0.5 * (counts / n - target).abs().sum() < 0.015


def toy_pair():
    target_table = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 1.5, 0.5], [0.3, -0.3, 1.0]])
    draft_table = torch.tensor([[-1.0, 1.0, 2.0], [1.0, -1.0, 1.0], [2.0, 0.5, -2.0]])
    return (FakeLM(lambda ctx: target_table[ctx[-1]].clone(), 3), FakeLM(lambda ctx: draft_table[ctx[-1]].clone(), 3),
            target_table)


@pytest.mark.parametrize("selection", ["kseq", "multiset"])
def test_spectr_joint_distribution_over_three_tokens_is_the_targets(selection):
    target, draft, table = toy_pair()
    config = make_config("spectr", {"rule": "sampling", "drafts": 3, "draft_length": 2, "selection": selection})
    counts: dict[tuple[int, ...], int] = {}
    runs = 3000
    for seed in range(runs):
        rng = torch.Generator().manual_seed(seed)
        drafter = SpecTrDrafter(draft, config, rng, "toy", shared=False)
        rounds = draft_verify(target, [0], drafter, config, rng, acceptance=spectr_acceptance(config))
        steps = (e for e in rounds if isinstance(e, TokenStep))
        key = tuple(s.token_id for s in itertools.islice(steps, 3))
        counts[key] = counts.get(key, 0) + 1
    exact = exact_distribution(lambda seq: torch.softmax(table[seq[-1] if seq else 0], 0), 3)
    assert total_variation(counts, exact) < 0.05


def test_spectr_records_the_kseq_vs_rrs_comparison_on_the_same_drafts(tiny_flat):
    request = RunRequest.build("spectr", {"rule": "sampling", "drafts": 4}, PROMPT, max_new_tokens=24, chat=False,
                               seed=2)
    trace = run_to_end(tiny_flat, request)
    rounds = [e for e in trace.events if isinstance(e, DraftRound)]
    assert rounds and all({"kseq_root_accept", "rrs_root_accept", "rrs_accepted", "rho"} <= set(r.details)
                          for r in rounds)
    assert all(1.0 <= r.details["rho"] <= 4.0 for r in rounds)
    # the trie holds at most k chains: at most k nodes per level
    assert all(len(r.draft_tokens) <= 4 * 3 for r in rounds)
    again = run_to_end(tiny_flat, request)
    assert again.token_ids == trace.token_ids
    figure = get_view("spectr").render([trace], 0)
    assert len(figure.data) == 4 and "SpecTr vs rejection sampling" in figure.layout.title.text


# ------------------------------------------------------------------------------------------------ ADED
def test_aded_puct_is_the_authors_formula():
    # Q + (c1 + ln((N_p + c2 + 1) / c2)) P sqrt(N_p) / (1 + N), by hand: W = 3, N = 2, P = 0.5, N_p = 10
    expected = 1.5 + (32.0 + math.log(19 / 8)) * 0.5 * math.sqrt(10) / 3
    assert puct(3.0, 2, 0.5, 10, 32.0, 8.0) == pytest.approx(expected)
    assert puct(0.0, 0, 0.9, 10, 32.0, 8.0) == math.inf  # unvisited: tried first
    assert puct(2.0, 1, 0.5, 0, 32.0, 8.0) == pytest.approx(2.0)  # sqrt(N_p) = 0, not sqrt(N_p + 1)


def test_aded_search_follows_puct_by_hand():
    matrix = TrigramMatrix({(0, 1): {2: 0.6, 3: 0.4}})  # neither child has a row: every path ends there
    nodes = search(matrix, [0, 1], simulations=3, depth=3, c1=32.0, c2=8.0, draws=iter([]))
    # 1: the root's whole row is expanded, the heavier child valued 1 + 0.6; 2: the unvisited child (+inf),
    # valued 1 + 0.4; 3: PUCT(2) = 1.6 + E 0.6 sqrt(2) / 2 > PUCT(3) = 1.4 + E 0.4 sqrt(2) / 2
    assert [(n.pair, n.visits) for n in nodes] == [((0, 1), 3), ((1, 2), 2), ((1, 3), 1)]
    assert [n.value for n in nodes] == pytest.approx([4.6, 3.2, 1.4])


def test_aded_drafts_the_visited_paths_extended_by_the_row_argmax():
    chain = TrigramMatrix({(0, 1): {2: 1.0}, (1, 2): {3: 1.0}, (2, 3): {4: 1.0}, (3, 4): {5: 1.0}, (4, 5): {6: 1.0}})
    nodes = search(chain, [0, 1], simulations=20, depth=3, c1=32.0, c2=8.0, draws=iter([0.5] * 60))
    assert len(nodes) == 4 and max(n.depth for n in nodes) == 3  # the search stops at depth D
    found = drafts(chain, nodes, paths=24, budget=64)
    assert found == [[2, 3], [2, 3, 4], [2, 3, 4, 5]]  # D + 1 tokens at most
    assert merge(found, 64) == ([2, 3, 4, 5], [-1, 0, 1, 2])


def test_aded_cut_drops_the_paths_with_most_distinct_tokens_first():
    assert cut([[1, 2], [1, 2, 3], [4]], 4) == [[1, 2], [4]]  # 6 distinct > 4: the 3-token path goes
    assert cut([[5, 5, 5], [6, 7]], 3) == [[5, 5, 5], [6, 7]]  # distinct tokens count, not length


def test_aded_adaptation_bumps_the_last_sixteen_tokens_trigrams_up_to_the_cap():
    context = list(range(100, 120))  # 20 distinct tokens: the last 16 hold 14 tri-grams
    matrix = TrigramMatrix({(103, 104): {105: 1.0}, (118, 118): {118: 2.99}})
    touched = matrix.adapt(context)
    assert touched == [(a, a + 1) for a in range(104, 118)]
    assert matrix.rows[(104, 105)] == {106: pytest.approx(0.04)}
    assert matrix.rows[(117, 118)] == {119: pytest.approx(0.04)}  # the newest token's tri-gram
    assert matrix.rows[(103, 104)] == {105: 1.0}  # outside the window
    matrix.adapt([118] * 3)
    assert matrix.rows[(118, 118)][118] == 3.0  # capped


def test_aded_first_round_holds_the_trigram_ending_at_the_prompts_last_token():
    drafter = AdedDrafter(make_config("aded", {}), torch.Generator().manual_seed(0))
    draft = drafter.propose([7, 8, 9, 7, 8])  # tri-grams 789, 897 and 978, the last ending at the last token
    # each seeded from the prompt (normalised: 1.0), then adapted (+0.04)
    assert drafter.matrix.rows == {(7, 8): {9: pytest.approx(1.04)}, (8, 9): {7: pytest.approx(1.04)},
                                   (9, 7): {8: pytest.approx(1.04)}}
    assert draft.tokens == [9, 7, 8, 9] and draft.parents == [-1, 0, 1, 2]


def test_aded_adapts_its_matrix_and_a_kept_matrix_starts_warm(tiny):
    prompt = "one two three four five six seven"
    config = {"keep_table": True}
    first = run_to_end(tiny, RunRequest.build("aded", config, prompt, max_new_tokens=30, chat=False))
    second = run_to_end(tiny, RunRequest.build("aded", config, prompt, max_new_tokens=30, chat=False))
    rows = [r.details["matrix_rows"] for r in first.rounds]
    assert rows == sorted(rows) and rows[-1] > rows[0]  # the matrix grows as decoding goes
    assert second.token_ids == first.token_ids
    # warm: more accepted per pass (a cold first run has nothing to draft until the prompt's tail repeats)
    assert second.finished.target_forward_passes < first.finished.target_forward_passes
    assert any(e.kind == "pool_update" for e in first.events)
    figure = get_view("aded").render([first], 0)
    assert len(figure.data) == 4


# ------------------------------------------------------------------------------------------- DEL, D^3
def test_tokens_per_layer_and_the_best_exit():
    # alpha = 0: a round yields one token whatever is drafted, so the cheapest round wins
    assert tokens_per_layer(0.0, 1, 1, 10) == pytest.approx(1 / 11)
    assert best_exit({2: 0.0, 5: 0.0}, 6, 10)[:2] == (2, 1)
    # alpha = 0.9 at exit 2: (1 - 0.9^(d+1)) / 0.1 / (2d + 10), best at a long draft
    exit_layer, length, tpl = best_exit({2: 0.9, 8: 0.95}, 8, 10)
    assert exit_layer == 2 and length > 3
    assert tpl == pytest.approx((1 - 0.9 ** (length + 1)) / 0.1 / (2 * length + 10))


def test_decayed_depths_follow_the_power_law():
    assert decayed_depths(30, 0.9, 4) == [27, 24, 21, 19]
    assert decayed_depths(8, 0.5, 4, min_layers=2) == [4, 2, 2, 2]
    assert decayed_depths(4, 0.999, 2) == [3, 3]


def shallow_exact_model():
    """A tiny model whose layers after the second add nothing: an exit after layer 2 is exactly the model."""
    lm = tiny_model(0, scale=8.0, layers=6)
    with torch.no_grad():
        for layer in list(decoder_layers(lm.model))[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return lm


def test_del_finds_the_exit_that_agrees_and_drafts_long():
    lm = shallow_exact_model()
    request = RunRequest.build("del", {"confidence": 0.0}, PROMPT, max_new_tokens=48, chat=False)
    trace = run_to_end(lm, request)
    assert trace.token_ids == run_to_end(lm, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=48,
                                                               chat=False)).token_ids
    first = trace.rounds[0]
    estimates = dict(zip(first.details["candidate_exits"].split(","),
                         (float(v) for v in first.details["layer_acceptance"].split(",")), strict=True))
    assert estimates["2"] == pytest.approx(1.0) and estimates["5"] == pytest.approx(1.0)  # seeded by the prompt
    assert all(r.details["exit_layer"] <= 2 for r in trace.rounds)  # never pays for the useless deep layers
    assert trace.metrics()["mean_accepted_tokens"] > 3
    for name in ("exit-layer", "layer-acceptance"):
        assert get_view(name).render([trace], 0).data


def test_del_on_a_random_model_drafts_short_at_the_cheapest_exit(tiny):
    trace = run_to_end(tiny_model(0, scale=8.0, layers=6), RunRequest.build("del", {"confidence": 0.0}, PROMPT,
                                                                          max_new_tokens=24, chat=False))
    assert {len(r.draft_tokens) for r in trace.rounds[2:]} == {1}


def middle_exact_model():
    """A tiny model whose middle layers (1-4 of 6) add nothing: a pass that keeps the first and the last layer is
    exactly the model, an early exit is not."""
    lm = tiny_model(0, scale=8.0, layers=6)
    with torch.no_grad():
        for layer in list(decoder_layers(lm.model))[1:5]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return lm


def test_depth_decay_keeps_the_first_and_last_layers_and_skips_the_middle():
    assert retained_layers(8, 8) == list(range(8))
    assert retained_layers(8, 5) == [0, 1, 2, 6, 7]  # ceil(5 / 2) first, floor(5 / 2) last
    assert retained_layers(8, 1) == [0]
    lm = tiny_model(0, layers=8)
    config = make_config("depth_decay", {"alpha": 0.85, "adaptive": False, "draft_length": 4})
    drafter = DepthDecayDrafter(lm, config, torch.Generator().manual_seed(0))
    assert drafter.depths() == [6, 5, 4, 4]  # floor(8 * 0.85^i)
    ours = list(decoder_layers(lm.model))
    ran = [[next(i for i, mine in enumerate(ours) if mine is layer) for layer in decoder_layers(drafter.view(n).model)]
           for n in drafter.depths()]
    assert ran == [[0, 1, 2, 5, 6, 7], [0, 1, 2, 6, 7], [0, 1, 6, 7], [0, 1, 6, 7]]


def test_depth_decay_drafts_each_token_with_fewer_layers():
    lm = middle_exact_model()
    params = {"alpha": 0.6, "adaptive": False, "draft_length": 4}
    trace = run_to_end(lm, RunRequest.build("depth_decay", params, PROMPT, max_new_tokens=32, chat=False))
    greedy = run_to_end(lm, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=32, chat=False))
    assert trace.token_ids == greedy.token_ids
    assert {r.details["draft_depths"] for r in trace.rounds} == {"3,2,2,2"}  # floor(6 * 0.6^i), at least 2
    assert {r.details["draft_layers"] for r in trace.rounds} == {"0-1,5;0,5;0,5;0,5"}
    # the skipped middle layers add nothing here, so every draft token is the target's (an early exit, which
    # drops the last layer, would be rejected)
    assert all(r.accepted_count == 4 for r in trace.rounds)
    assert get_view("draft-depth").render([trace], 0).data


# ------------------------------------------------------------------------------------------------- EAD
def test_ead_switching_rule_waits_min_run_tokens():
    assert next_owner(False, 3.0, 2.0, written=4, min_run=5) is False  # not yet: the small model keeps writing
    assert next_owner(False, 3.0, 2.0, written=5, min_run=5) is True
    assert next_owner(True, 1.0, 2.0, written=5, min_run=5) is False
    assert next_owner(True, 2.0, 2.0, written=9, min_run=5) is False  # at the threshold: back to the small one


def test_ead_follows_its_rule_and_records_each_tokens_owner():
    lm = tiny_model(0, scale=3.0, layers=4)
    params = {"threshold": 6.45, "window": 3, "min_run": 2}
    trace = run_to_end(lm, RunRequest.build("ead", params, PROMPT, max_new_tokens=40, chat=False))
    steps = trace.token_steps
    owners = [s.details["large"] == 1.0 for s in steps]
    assert owners[0] is False and any(owners) and not all(owners)
    large, written = False, 0  # replay the rule on the recorded entropies
    for step in steps:
        assert (step.details["large"] == 1.0) == large
        written += 1
        switch = next_owner(large, step.details["rolling_entropy"], 6.45, written, 2)
        large, written = (switch, 0) if switch != large else (large, written)
    assert trace.finished.target_forward_passes == sum(owners)  # the large model ran once per token it wrote
    assert get_view("entropy-handover").render([trace], 0).data


def test_ead_is_the_small_models_greedy_below_any_entropy_and_exact_with_itself():
    lm = tiny_model(0, scale=3.0, layers=4)
    small = load_draft_model(lm, "layer-skip")
    never = run_to_end(lm, RunRequest.build("ead", {"threshold": 16.0}, PROMPT, max_new_tokens=30, chat=False))
    assert never.token_ids == run_to_end(small, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=30,
                                                                 chat=False)).token_ids
    greedy = run_to_end(lm, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=30, chat=False)).token_ids
    itself = run_to_end(lm, RunRequest.build("ead", {"threshold": 0.0, "small_model": "target", "min_run": 1}, PROMPT,
                                             max_new_tokens=30, chat=False))
    assert itself.token_ids == greedy
