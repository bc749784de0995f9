"""Tree speculation: token-identical to greedy under the greedy rule; exactly the target distribution under
the sampling rule for every way of drawing siblings; pools and views."""

import itertools

import pytest
import torch

from explorer.check import exact_distribution, total_variation
from explorer.events import PoolUpdate, TokenStep
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import make_config
from explorer.strategies.acceptance import GreedyMatch, RejectionSampling, accept_probability, residual
from explorer.strategies.draft_verify import DraftTree, SpeculativeConfig, Verdict, draft_verify
from explorer.strategies.lookahead import LookaheadConfig, LookaheadDrafter, hits, prefix_tree
from explorer.strategies.tree_speculative import TreeDrafter, gumbel_top_k
from explorer.testing import tiny_model
from explorer.trees import parse_widths
from tests.fakes import FakeLM

TREE_METHODS = [
    ("tree_speculative", {"mode": "topk"}),
    ("tree_speculative", {"mode": "topk", "draft_model": "target"}),
    ("tree_speculative", {"mode": "sample", "branching": 3, "depth": 2}),
    ("tree_speculative", {"mode": "gumbel"}),
    ("tree_speculative", {"mode": "dynamic", "budget": 6}),
    ("tree_speculative", {"skip": "1"}),
    ("token_recycling", {}),
    ("token_recycling", {"tree": "widths", "widths": "3,1"}),
    ("token_recycling", {"keep_table": True}),
    ("lookahead", {}),
    ("lookahead", {"window": 3, "ngram": 2, "guesses": 5}),
]
PROMPTS = ["Hello world hello world", "abc abc abc", "The cat sat on the mat. The cat"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, params", TREE_METHODS)
def test_greedy_rule_tree_methods_are_token_identical_to_greedy(seed, name, params):
    lm = tiny_model(seed, scale=8.0 + 8 * seed)
    for prompt in PROMPTS:
        reference = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=36))
        trace = run_to_end(lm, RunRequest.build(name, params, prompt, max_new_tokens=36))
        assert trace.token_ids == reference.token_ids, (name, params, prompt)
        for round_ in trace.rounds:
            assert round_.verdicts.count("accepted") == round_.accepted_count <= len(round_.draft_tokens)


def test_target_drafting_its_own_topk_tree_accepts_the_whole_depth(tiny):
    config = make_config("tree_speculative", {"mode": "topk", "branching": 2, "depth": 3, "draft_model": "target"})
    trace = run_to_end(tiny, RunRequest("tree_speculative", config, "Hello", max_new_tokens=40))
    assert all(r.accepted_count == 3 and len(r.draft_tokens) == 2 + 4 + 8 for r in trace.rounds)
    assert trace.mean_accepted_tokens == 4.0 and trace.acceptance_by_depth() == [1.0, 1.0, 1.0]


def test_greedy_tree_verification_follows_the_argmax_path():
    logits = torch.full((6, 5), -5.0)
    for row, best in enumerate([2, 3, 0, 0, 1, 4]):  # row 0 = root, row i + 1 = after node i
        logits[row, best] = 5.0
    # root -> {2 (node 0), 1 (node 1)}; node 0 -> {4 (node 2), 3 (node 3)}; node 3 -> {1 (node 4)}
    draft = DraftTree([2, 1, 4, 3, 1], [-1, -1, 0, 0, 3], [1.0] * 5, None, mode="point")
    verdict = GreedyMatch().verify(logits, draft, [0], torch.Generator())
    assert verdict.path == [0, 3, 4] and verdict.bonus_token == 4 and verdict.bonus_kind == "bonus"
    assert verdict.node_verdicts == ["accepted", "rejected", "rejected", "accepted", "accepted"]
    logits[5] = 0.0
    logits[1, 2] = 9.0  # now node 0's best child is token 2, which was not drafted: a correction
    verdict = GreedyMatch().verify(logits, draft, [0], torch.Generator())
    assert verdict.path == [0] and verdict.bonus_token == 2 and verdict.bonus_kind == "correction"


def exact_output(p, q, children, mode):
    """The output distribution of recursive rejection over `children` (one draw), from the pure helpers."""
    out = torch.zeros_like(p)
    stay = 1.0
    q = q.clone()
    for token in children:
        q_token = torch.eye(len(p), dtype=p.dtype)[token] if mode == "point" else q
        a = accept_probability(p[token], q_token[token])
        out[token] += stay * a
        stay = stay * (1 - a)
        p = residual(p, q_token)
        if mode == "without_replacement":
            q[token] = 0
            q = q / q.sum() if q.sum() > 0 else q
    return out + stay * p


def draws(q, k, mode):
    """Every way the drafter can pick k children, with its probability."""
    v = len(q)
    if mode == "point":
        yield 1.0, torch.topk(q, k).indices.tolist()
    elif mode == "iid":
        for combo in itertools.product(range(v), repeat=k):
            yield float(torch.prod(q[list(combo)])), list(combo)
    else:
        for combo in itertools.permutations(range(v), k):
            prob, left = 1.0, 1.0
            for token in combo:
                prob *= float(q[token]) / left
                left -= float(q[token])
            yield prob, list(combo)


@pytest.mark.parametrize("mode", ["point", "iid", "without_replacement"])
def test_one_step_output_is_exactly_p_for_every_sibling_mode(mode):
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        p = torch.softmax(torch.randn(4, generator=g, dtype=torch.float64) * 2, 0)
        q = torch.softmax(torch.randn(4, generator=g, dtype=torch.float64) * 2, 0)
        for k in (1, 2, 3):
            total = sum(weight * exact_output(p, q, kids, mode) for weight, kids in draws(q, k, mode))
            torch.testing.assert_close(total, p)


@pytest.mark.parametrize("mode", ["point", "iid", "without_replacement"])
def test_verify_tree_frequencies_match_p(mode):
    p_logits = torch.tensor([1.2, 0.1, -0.6, 0.7])
    q = torch.softmax(torch.tensor([-1.0, 1.1, 1.3, 0.0]), 0)
    g = torch.Generator().manual_seed(5)
    counts = torch.zeros(4)
    n = 12000
    logits = torch.stack([p_logits, torch.zeros(4), torch.zeros(4)])
    for _ in range(n):
        if mode == "point":
            kids = torch.topk(q, 2).indices.tolist()
        elif mode == "iid":
            kids = torch.multinomial(q, 2, replacement=True, generator=g).tolist()
        else:
            kids = gumbel_top_k(q.log(), 2, g)
        draft = DraftTree(kids, [-1, -1], [float(q[t]) for t in kids], q.expand(2, -1), mode=mode)
        verdict = RejectionSampling(SpeculativeConfig(rule="sampling")).verify(logits, draft, [0], g)
        first = kids[verdict.path[0]] if verdict.path else verdict.bonus_token
        counts[first] += 1
    target = torch.softmax(p_logits, 0)
    assert 0.5 * (counts / n - target).abs().sum() < 0.02
    assert 0.5 * (q - target).abs().sum() > 0.3


def toy_pair():
    target_table = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 1.5, 0.5], [0.3, -0.3, 1.0]])
    draft_table = torch.tensor([[-1.0, 1.0, 2.0], [1.0, -1.0, 1.0], [2.0, 0.5, -2.0]])
    return (FakeLM(lambda ctx: target_table[ctx[-1]].clone(), 3), FakeLM(lambda ctx: draft_table[ctx[-1]].clone(), 3),
            target_table)


@pytest.mark.parametrize("mode", ["topk", "sample", "gumbel", "dynamic"])
def test_monte_carlo_tree_sampling_keeps_the_joint_distribution(mode):
    target, draft, table = toy_pair()
    config = make_config("tree_speculative", {"rule": "sampling", "mode": mode, "branching": 2, "depth": 2,
                                              "budget": 4})
    counts: dict[tuple[int, ...], int] = {}
    runs = 3000
    for seed in range(runs):
        rng = torch.Generator().manual_seed(seed)
        events = draft_verify(target, [0], TreeDrafter(draft, config, rng, "toy"), config, rng)
        steps = (e for e in events if isinstance(e, TokenStep))
        key = tuple(s.token_id for s in itertools.islice(steps, 3))
        counts[key] = counts.get(key, 0) + 1
    exact = exact_distribution(lambda seq: torch.softmax(table[seq[-1] if seq else 0], 0), 3)
    assert total_variation(counts, exact) < 0.06


def test_pools_record_what_they_learn(tiny):
    trace = run_to_end(tiny, RunRequest.build("lookahead", {}, "ab ab ab ab", max_new_tokens=30))
    updates = [e for e in trace.events if isinstance(e, PoolUpdate)]
    assert updates and all(len(c) == 2 for u in updates for c in u.continuations)  # n - 1 = 2 tokens each
    assert updates[-1].pool_size >= len(updates[-1].heads) or updates[-1].pool_size > 0
    recycled = run_to_end(tiny, RunRequest.build("token_recycling", {}, "Hello", max_new_tokens=20))
    updates = [e for e in recycled.events if isinstance(e, PoolUpdate)]
    assert updates and all(len(c) == 8 for u in updates for c in u.continuations)


def test_lookahead_window_moves_by_the_jacobi_update():
    drafter = LookaheadDrafter(LookaheadConfig(window=3, ngram=2, guesses=1))
    tree = drafter.propose([5, 6, 7, 8])
    assert tree.tokens[:3] == [6, 7, 8] and tree.parents[:3] == [-1, 0, 1]
    drafter.observe(Verdict(0, 9, "correction", [], [], [], [], [9, 1, 2, 3]))
    assert drafter.window == [1, 2, 3]
    assert (1,) in drafter.pool[6] and (3,) in drafter.pool[8]  # (w_j, o_(j+1)) bigrams


def test_lookahead_reads_ngrams_along_the_diagonals_of_its_2d_window():
    drafter = LookaheadDrafter(LookaheadConfig(window=3, ngram=3, guesses=0))
    drafter.propose([5, 6, 7, 8])  # level 0: [6, 7, 8]
    drafter.observe(Verdict(0, 20, "correction", [], [], [], [], [20, 21, 22, 23]))  # o = level 1 after a shift
    assert drafter.levels == [[7, 8], [21, 22, 23]] and not drafter.pool  # two levels: no trigram yet
    drafter.propose([5, 6, 7, 8, 20])  # levels padded: [7, 8, 8], [21, 22, 23]
    drafter.observe(Verdict(0, 30, "correction", [], [], [], [], [30, 31, 32, 33]))
    # diagonals (L0_j, L1_(j+1), o_(j+2)): (7, 22, 32), (8, 23, 33); never (21, 22, 32) along one level
    assert dict(drafter.pool) == {7: {(22, 32): None}, 8: {(23, 33): None}}


def test_lookahead_verification_branch_is_a_prefix_tree():
    tokens, parents, placed = prefix_tree([[1, 2, 3], [4, 5], [4, 6], [4, 5, 7], [1, 9]])
    assert tokens == [1, 2, 3, 4, 5, 6, 7, 9] and parents == [-1, 0, 1, -1, 3, 3, 4, 0]
    assert placed == [[0, 1, 2], [3, 4], [3, 5], [3, 4, 6], [0, 7]]
    # a correct n-gram that shares its first token with an earlier one is reachable: the greedy walk finds it
    logits = torch.full((len(tokens) + 1, 10), -5.0)
    for row, best in [(0, 4), (4, 6), (6, 8)]:  # target: 4, then 6... row = node + 1
        logits[row, best] = 5.0
    verdict = GreedyMatch().verify(logits, DraftTree(tokens, parents, [1.0] * len(tokens), None, mode="point"), [],
                                   torch.Generator())
    assert verdict.path == [3, 5] and hits(3, verdict.node_verdicts) == (0, 2)


def test_bad_tree_parameters(tiny):
    with pytest.raises(ValueError, match="mode must be one of"):
        make_config("tree_speculative", {"mode": "forest"})
    with pytest.raises(ValueError, match="widths must be comma-separated"):
        parse_widths("2,x")
    with pytest.raises(ValueError, match="cannot exceed"):
        make_config("token_recycling", {"tree": "widths", "widths": "9", "candidates": 4})


def test_tree_views(tiny):
    from viz.speculative import draft_tree_figure, pool_figure, pool_graph, tree_size_figure

    tree = run_to_end(tiny, RunRequest.build("tree_speculative", {}, "Hello", max_new_tokens=20))
    figure = draft_tree_figure(tree)
    assert len(figure.layout.sliders[0].steps) == len(tree.rounds)
    keys = [t.name for t in figure.data if t.showlegend]  # the colour key: verdicts and the bonus marker
    assert keys == ["accepted", "rejected", "not reached", "bonus / correction token", "committed context"]
    assert len(figure.data) == 2 * len(tree.rounds) + len(keys) and figure.data[1].visible
    assert not figure.data[3].visible
    assert len(tree_size_figure([tree]).data) == 2
    recycled = run_to_end(tiny, RunRequest.build("token_recycling", {}, "ab ab ab ab ab",
                          max_new_tokens=30))
    graph = pool_graph(recycled)
    assert graph.number_of_edges() > 0
    if sum(r.accepted_count for r in recycled.rounds):
        assert any(d["accepted"] for _, _, d in graph.edges(data=True))
    assert pool_figure(recycled).data and pool_figure(tree).layout.annotations  # tree has no pool


def test_tree_rounds_round_trip_through_the_store(tiny_flat, store):
    from explorer.recorder import Recorder

    config = make_config("tree_speculative", {"rule": "sampling", "mode": "gumbel"})
    trace = run_to_end(tiny_flat, RunRequest("tree_speculative", config, "Hello", max_new_tokens=20, seed=1),
                       recorder=Recorder(store))
    assert any(v == "unreached" for r in trace.rounds for v in r.verdicts)
    assert store.load_trace(trace.run_id) == trace


def test_pool_graph_is_layered_readable_and_pruned(tiny):
    from viz.speculative import pool_figure

    recycled = run_to_end(tiny, RunRequest.build("token_recycling", {}, "ab ab ab ab ab", max_new_tokens=30))
    figure = pool_figure(recycled, max_edges=20)
    nodes = figure.data[-1]
    assert all(x == int(x) for x in nodes.x)  # layers, not a circle
    assert not any(text.startswith("#") for text in nodes.text)  # token texts, never raw ids
    edges = sum(len([v for v in t.x if v is not None]) // 2 for t in figure.data[:-1])
    assert edges <= 20 and "edges (accepted first" in figure.layout.title.text


def test_dyspec_expands_many_nodes_per_draft_pass_above_its_threshold(tiny):
    trace = run_to_end(tiny, RunRequest.build("tree_speculative", {"mode": "dynamic", "budget": 16,
                                                                   "threshold": 0.001, "draft_model": "target"},
                                              "Hello world", max_new_tokens=30, chat=False))
    for r in trace.rounds:
        assert len(r.draft_tokens) <= 16
        assert r.details["draft_forward_passes"] <= r.details["waves"] + 1  # the root pass + one per wave
        assert r.details["waves"] < len(r.draft_tokens) or len(r.draft_tokens) <= 2  # batched, not per node
        for node, parent in enumerate(r.parents):  # children of one parent are distinct: without replacement
            assert (parent, r.draft_tokens[node]) not in {(p, r.draft_tokens[i]) for i, p in
                                                          enumerate(r.parents[:node])}
    narrow = run_to_end(tiny, RunRequest.build("tree_speculative", {"mode": "dynamic", "budget": 16,
                                                                    "threshold": 0.9, "draft_model": "target"},
                                               "Hello world", max_new_tokens=30, chat=False))
    assert sum(len(r.draft_tokens) for r in narrow.rounds) < sum(len(r.draft_tokens) for r in trace.rounds)


def test_token_recycling_template_gives_higher_ranked_children_more_branches():
    from explorer.strategies.token_recycling import RecyclingDrafter, TokenRecyclingConfig, template_shape

    parents, ranks = template_shape()
    assert len(parents) == 79 and max(depth_of(parents, i) for i in range(len(parents))) == 5  # 6 levels
    kids = {i: [j for j, p in enumerate(parents) if p == i] for i in range(len(parents))}
    for node, children in kids.items():  # B_d - r: a better-ranked sibling never has fewer children
        siblings = [j for j, p in enumerate(parents) if p == parents[node]]
        for other in siblings:
            if ranks[other] < ranks[node]:
                assert len(kids[other]) >= len(children)
    drafter = RecyclingDrafter(TokenRecyclingConfig())
    drafter.adjacency = {t: [(t + r + 1) % 50 for r in range(8)] for t in range(50)}
    tree = drafter.propose([3])
    assert tree.parents == parents  # a full table fills the whole template
    assert tree.tokens[:8] == drafter.adjacency[3] and tree.tokens[8] == drafter.adjacency[4][0]


def depth_of(parents, node):
    depth = 0
    while parents[node] >= 0:
        node, depth = parents[node], depth + 1
    return depth


def test_token_recycling_keeps_its_table_across_runs_when_asked(tiny):
    from explorer.strategies.token_recycling import TABLES

    TABLES.clear()
    first = run_to_end(tiny, RunRequest.build("token_recycling", {"keep_table": True}, "ab ab ab", max_new_tokens=20))
    second = run_to_end(tiny, RunRequest.build("token_recycling", {"keep_table": True}, "ab ab ab", max_new_tokens=20))
    cold = run_to_end(tiny, RunRequest.build("token_recycling", {}, "ab ab ab", max_new_tokens=20))
    assert first.token_ids == second.token_ids == cold.token_ids
    assert second.rounds[0].details["table_entries"] > cold.rounds[0].details["table_entries"]  # a warm start
    assert len(TABLES) == 1
    TABLES.clear()
