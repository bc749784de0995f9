"""Lattice decoding: the lattice's bookkeeping (paths, Viterbi, merges), the greedy completion, the budget,
the record and its view."""

import pytest

from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.lattice import Lattice, LatticeConfig, build_lattice
from viz.catalog import get_view

PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"


def hand_lattice() -> Lattice:
    """root -a-> 1 -c-> 3 -e-> 5 (end); root -b-> 2 -c-> 3 (merged); 2 -d-> 4 (end)."""
    lattice = Lattice.start()
    a = lattice.add(0, 10, -0.5)
    b = lattice.add(0, 11, -1.0)
    c = lattice.add(a, 12, -0.2)
    lattice.edges.append((b, c, -0.1, True))
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


def test_the_first_completion_is_greedy_and_the_budget_holds(tiny_flat):
    greedy = run_to_end(tiny_flat, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=12, chat=False))
    ids = tiny_flat.encode_prompt(PROMPT, chat=False)
    before = tiny_flat.forward_passes
    lattice, merges, greedy_nodes = build_lattice(tiny_flat, ids, LatticeConfig(expansions=30), 12)
    assert tiny_flat.forward_passes - before <= 30 + 1  # the prompt pass + at most 30 calls
    assert [lattice.tokens[n] for n in greedy_nodes] == greedy.token_ids
    assert all(lattice.depths[t] == lattice.depths[f] + 1 for f, t, _, _ in lattice.edges)  # one layer a position
    merged = [(f, t) for f, t, _, m in lattice.edges if m]
    assert len(merged) == merges
    for source, target in merged:  # a merge joins hypotheses ending in the same bigram at the same position
        assert lattice.main_path(source)[-1:] == lattice.main_path(target)[-2:-1]
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
