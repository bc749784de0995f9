"""Lattice decoding: the lattice's bookkeeping (paths, Viterbi, merges), the authors' frontier order and
recombination rule on scripted toy models, the greedy completion, the budget, the record and its view."""

import math

import pytest
import torch

from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.lattice import ROOT, Lattice, LatticeConfig, build_lattice, frontier_score
from tests.fakes import FakeLM
from viz.catalog import get_view

PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"
EOS, JUNK = 0, 9  # JUNK: the scripted models' runner-up that nobody wants


def scripted(next_tokens: dict[tuple[int, ...], dict[int, float]], prompt: list[int], vocab: int = 24) -> FakeLM:
    """A toy LM: after the prompt, the generated tokens so far pick a distribution {token: p}; any other
    context ends (EOS) with JUNK as the runner-up."""
    def logits_for(context: list[int]) -> torch.Tensor:
        logits = torch.full((vocab,), -40.0)
        for token, p in next_tokens.get(tuple(context[len(prompt):]), {EOS: 0.999, JUNK: 0.001}).items():
            logits[token] = math.log(p)
        return logits
    return FakeLM(logits_for, vocab, eos=EOS)


def chain(tokens: list[int], p: float = 0.999) -> dict[tuple[int, ...], dict[int, float]]:
    """A greedy path: each prefix of `tokens` is followed by the next token, then EOS."""
    return {tuple(tokens[:i]): {token: p, JUNK: 1 - p} for i, token in enumerate([*tokens, EOS])}


def hand_lattice() -> Lattice:
    """root -a-> 1 -c-> 3 -e-> 5 (end); root -b-> 2 -c-> 3 (merged); 2 -d-> 4 (end)."""
    lattice = Lattice.start()
    a = lattice.add(0, 10, -0.5)
    b = lattice.add(0, 11, -1.0)
    c = lattice.add(a, 12, -0.2)
    lattice.join(b, c, -0.1)
    d = lattice.add(b, 13, -3.0)
    e = lattice.add(c, 14, -0.3)
    lattice.terminal[d] = lattice.terminal[e] = True
    return lattice


def test_path_count_and_viterbi_on_a_hand_built_lattice():
    lattice = hand_lattice()
    assert lattice.path_count() == 3  # a-c-e, b-c-e, b-d
    # a-c-e: -1.0 over 3 tokens; b-c-e: -1.4; b-d: -4.0 over 2
    assert lattice.best_path() == [1, 3, 5]
    lattice.edges[1] = (0, 2, -0.01, False)  # make b nearly certain: b-c-e is now the best path
    assert lattice.best_path() == [2, 3, 5]


def test_a_merge_across_lengths_into_an_older_node():
    """root-a-b-c-d (end) and root-x-y-z joined into c: the path x-y-z-c-d is 5 tokens long, and the merge edge
    runs from a newer node to an older one (ids are not an order)."""
    lattice = Lattice.start()
    a = lattice.add(ROOT, 1, -1.0)
    b = lattice.add(a, 2, -1.0)
    c = lattice.add(b, 3, -1.0)
    d = lattice.add(c, 4, -1.0)
    x = lattice.add(ROOT, 5, -0.1)
    y = lattice.add(x, 6, -0.1)
    z = lattice.add(y, 7, -0.1)
    lattice.join(z, c, -0.1)
    lattice.terminal[d] = True
    assert lattice.topological_order().index(z) < lattice.topological_order().index(c)
    assert lattice.path_count() == 2
    assert lattice.best_path() == [x, y, z, c, d]  # mean -1.3 / 5 beats -4 / 4
    assert lattice.best_path(max_length=4) == [a, b, c, d]  # the longer path does not fit
    assert lattice.ngrams(c, 2) == {(2, 3), (7, 3)} and lattice.match_start(c, (7, 3)) == z


def test_the_frontier_score_is_the_sum_or_the_length_normalised_sum():
    assert frontier_score(-3.0, 4, 0.0) == -3.0
    assert frontier_score(-3.0, 4, 0.75) == pytest.approx(-3.0 / 4 ** 0.75)


def test_the_frontier_ranks_runner_ups_by_their_length_normalised_score():
    """Greedy: a a a a a a EOS. Runner-ups: b at position 1, s = log .2 = -1.61; c at position 6, s = log .8
    + 4 log .98 + log .05 = -3.30. By s(y) b comes first; by s(y)/|y|^0.75 (|y| counting the start token: 2
    and 7) c does (-0.77 > -0.96), as in the authors' runs."""
    a, b, c = 1, 2, 3
    rules = {(): {a: 0.8, b: 0.2}, **{(a,) * k: {a: 0.98, c: 0.02} for k in range(1, 5)},
             (a,) * 5: {a: 0.95, c: 0.05}, (a,) * 6: {EOS: 0.999, JUNK: 0.001}}
    model = scripted(rules, [5])
    # 7 calls complete the greedy path; the 8th completes the first candidate popped: node 8
    lattice, _, greedy = build_lattice(model, [5], LatticeConfig(expansions=8, branching=1), 10)
    assert [lattice.tokens[n] for n in greedy] == [a] * 6 + [EOS]
    assert (lattice.tokens[8], lattice.depths[8]) == (c, 6)
    lattice, _, _ = build_lattice(model, [5], LatticeConfig(expansions=8, branching=1, length_power=0.0), 10)
    assert (lattice.tokens[8], lattice.depths[8]) == (b, 1)


def two_paths(fillers: int) -> FakeLM:
    """Greedy: p, `fillers` tokens, s, t, EOS; the runner-up u at position 1 continues u, s, t, EOS: the bigram
    (s, t) ends at position fillers + 3 on one path and at 3 on the other."""
    p, u, s, t = 1, 2, 3, 4
    rules = {**chain([p, *range(10, 10 + fillers), s, t]), **chain([u, s, t])}
    rules[()] = {p: 0.7, u: 0.3}
    return scripted(rules, [5])


@pytest.mark.parametrize("fillers, options, merged", [(0, {}, True), (2, {}, True), (4, {}, True), (5, {}, False),
                                                      (2, {"len_diff": 2}, False), (2, {"len_diff": 3}, True)])
def test_recombination_joins_paths_of_different_lengths_within_len_diff(fillers, options, merged):
    """The continuation t after u, s (position 3) ends in the bigram (s, t), as the node t at position
    fillers + 3 does: RCB merges it when the lengths differ by less than len_diff (default 5). Merged, it is
    dropped: an edge joins s to the older t, and the completion stops (u, s, t, EOS is a path of G through it)."""
    u, s, t = 2, 3, 4
    model = two_paths(fillers)
    # the greedy path takes fillers + 4 calls; u, s, t two more
    config = LatticeConfig(expansions=fillers + 6, branching=1, ngram=2, **options)
    lattice, merges, greedy = build_lattice(model, [5], config, 20)
    older_t = greedy[-2]
    (u_node,) = [n for n, tok in enumerate(lattice.tokens) if tok == u and lattice.main_parent[n] == ROOT]
    s_node = next(n for n, tok in enumerate(lattice.tokens) if tok == s and lattice.main_parent[n] == u_node)
    if merged:
        assert merges == 1 and lattice.tokens.count(t) == 1
        assert (s_node, older_t, pytest.approx(math.log(0.999)), True) in lattice.edges
        assert lattice.parents[older_t] == [greedy[-3], s_node]
        assert lattice.path_count() == 2
    else:
        assert merges == 0 and lattice.tokens.count(t) == 2
        assert not any(m for *_, m in lattice.edges)


def test_a_path_is_never_merged_into_its_own_ancestors():
    """p s t q s t: the second (s, t) matches the first within len_diff, but the merge would close a cycle."""
    p, s, t, q = 1, 3, 4, 6
    model = scripted(chain([p, s, t, q, s, t]), [5])
    lattice, merges, greedy = build_lattice(model, [5], LatticeConfig(expansions=7, branching=1, ngram=2), 20)
    assert merges == 0 and [lattice.tokens[n] for n in greedy] == [p, s, t, q, s, t, EOS]


def test_a_runner_up_that_repeats_a_better_tokens_text_is_skipped():
    class Cased(FakeLM):
        def piece(self, token_id: int) -> str:
            return {2: " Cat", 3: "cat"}.get(token_id, f"<{token_id}>")

    base = scripted({(): {1: 0.5, 2: 0.3, 3: 0.2}}, [5])
    model = Cased(base.logits_for, base.vocab_size, eos=EOS)
    lattice, _, _ = build_lattice(model, [5], LatticeConfig(expansions=20, branching=2), 6)
    first = {lattice.tokens[n] for n, parent in enumerate(lattice.main_parent) if parent == ROOT}
    assert first == {1, 2}


def other_grams(lattice: Lattice, node: int, skip: int, n: int) -> set[tuple[int, ...]]:
    """The n-grams into `node` through its parents other than `skip`."""
    return {(*gram, lattice.tokens[node]) for parent in lattice.parents[node] if parent not in (skip, ROOT)
            for gram in lattice.ngrams(parent, n - 1)}


def test_the_first_completion_is_greedy_and_the_budget_holds(tiny_flat):
    greedy = run_to_end(tiny_flat, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=12, chat=False))
    ids = tiny_flat.encode_prompt(PROMPT, chat=False)
    before = tiny_flat.forward_passes
    config = LatticeConfig(expansions=30, ngram=2)
    lattice, merges, greedy_nodes = build_lattice(tiny_flat, ids, config, 12)
    assert tiny_flat.forward_passes - before <= 30 + 1  # the prompt pass + at most 30 calls
    assert [lattice.tokens[n] for n in greedy_nodes] == greedy.token_ids
    assert all(lattice.depths[t] == lattice.depths[f] + 1 for f, t, _, m in lattice.edges if not m)
    assert sorted(lattice.topological_order()) == list(range(len(lattice.tokens)))  # G stays acyclic
    merged = [(f, t) for f, t, _, m in lattice.edges if m]
    assert len(merged) == merges
    for source, target in merged:  # a merge joins a continuation to a node ending a path in the same bigram
        assert (*lattice.main_path(source)[-1:], lattice.tokens[target]) in other_grams(lattice, target, source, 2)
    assert lattice.path_count() >= sum(lattice.terminal)


def test_the_run_commits_the_best_path_and_records_the_lattice(tiny_flat, store):
    trace = run_to_end(tiny_flat, RunRequest.build("lattice", {"expansions": 40, "ngram": 1}, PROMPT,
                                                   max_new_tokens=10, chat=False))
    result = next(e for e in trace.events if e.kind == "lattice_result")
    assert trace.token_ids == [result.tokens[n] for n in result.chosen]
    assert result.merges > 0 and result.path_count > len(result.terminal)
    total = sum(s.logprob for s in trace.token_steps)
    edges = {(f, t): lp for f, t, lp in zip(result.edge_from, result.edge_to, result.edge_logprobs, strict=True)}
    on_path = [edges[pair] for pair in zip([0, *result.chosen], result.chosen, strict=False)]
    if not any(m for f, t, m in zip(result.edge_from, result.edge_to, result.edge_merged, strict=True)
               if (f, t) in set(zip([0, *result.chosen], result.chosen, strict=False))):
        assert total == pytest.approx(sum(on_path), abs=1e-3)  # no merge on the path: scores are exact
    figure = get_view("lattice").render([trace], 0)
    assert "distinct paths" in figure.layout.title.text and len(figure.data) == 5
    store.save_trace(trace)
    assert store.load_trace(trace.started.run_id).events == trace.events
