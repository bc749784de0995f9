"""Lattice decoding: best-first search with hypothesis recombination (Xu, Jonnalagadda, Durrett 2022, "Massive-
scale Decoding for Text Generation using Lattices", arXiv:2112.07660).

Notation: O = the search frontier (a priority queue of (parent node, next token) candidates, scored by the
hypothesis's log-probability s(y) = sum log p), n = the recombination n-gram size, G = the lattice (nodes =
tokens at positions, edges = "this token can follow that one").
1. Pop the best candidate from O.
2. Recombination (RCB): if a node of G at the same position already ends in the same n-gram as the candidate,
   the candidate is merged into it: a merge edge joins the candidate's parent to that node, and the two
   hypotheses share every continuation found from there (the model would continue them alike).
3. Otherwise add the node and complete its path depth-first (the paper's modification of best-first search):
   follow the model's argmax token by token, pushing the runner-up tokens of every step onto O, until an end
   token, the length limit, or a merge.
The budget is the number of model calls (`expansions`); nothing is pruned, so G encodes many more complete
outputs than calls: the number of distinct paths is counted over G. The run commits G's best complete path by
mean log-probability (Viterbi over the edges' scores); a LatticeResult records G for the lattice view.
Departures: merges only join nodes at the same position (so G stays a DAG with one layer per position; the
paper also merges across lengths, and offers ZIP, a more aggressive merge); candidates are scored by s(y)
without the paper's length heuristics; a merged path's score through its new edge is the sum of the scores
each edge had where it was found (the approximation recombination makes).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, LatticeResult
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register

ROOT = 0


@dataclass(frozen=True)
class LatticeConfig(Checked):
    expansions: int = param(48, "budget: model calls", minimum=1, maximum=512, step=1)
    branching: int = param(2, "runner-up tokens pushed onto the frontier at each step", minimum=1, maximum=8,
                           step=1)
    ngram: int = param(2, "n: merge hypotheses whose last n tokens agree (at the same position)", minimum=1,
                       maximum=6, step=1)


@dataclass
class Lattice:
    """G as plain lists: node 0 is the end of the prompt."""

    tokens: list[int]
    depths: list[int]
    main_parent: list[int]  # the node each node was first reached from
    scores: list[float]  # s(y) of the path that created the node
    edges: list[tuple[int, int, float, bool]]  # (from, to, log p of `to`'s token there, merge?)
    terminal: list[bool]

    @classmethod
    def start(cls) -> Lattice:
        return cls([-1], [0], [-1], [0.0], [], [False])

    def main_path(self, node: int) -> list[int]:
        """The tokens of the path that created `node` (root excluded)."""
        tokens: list[int] = []
        while node != ROOT:
            tokens.append(self.tokens[node])
            node = self.main_parent[node]
        return tokens[::-1]

    def add(self, parent: int, token: int, logp: float) -> int:
        self.tokens.append(token)
        self.depths.append(self.depths[parent] + 1)
        self.main_parent.append(parent)
        self.scores.append(self.scores[parent] + logp)
        self.terminal.append(False)
        self.edges.append((parent, len(self.tokens) - 1, logp, False))
        return len(self.tokens) - 1

    def path_count(self) -> int:
        """Distinct root-to-terminal paths (edges only go one position deeper, so depth order is topological)."""
        count = [0] * len(self.tokens)
        count[ROOT] = 1
        for source, target, _, _ in sorted(self.edges, key=lambda e: self.depths[e[0]]):
            count[target] += count[source]
        return sum(c for c, end in zip(count, self.terminal, strict=True) if end)

    def best_path(self) -> list[int]:
        """The terminal path with the best mean log-probability (Viterbi best sum per node), root excluded."""
        best = [float("-inf")] * len(self.tokens)
        back = [-1] * len(self.tokens)
        best[ROOT] = 0.0
        for source, target, logp, _ in sorted(self.edges, key=lambda e: self.depths[e[0]]):
            if best[source] + logp > best[target]:
                best[target], back[target] = best[source] + logp, source
        ends = [n for n, end in enumerate(self.terminal) if end and best[n] > float("-inf")]
        node = max(ends, key=lambda n: (best[n] / self.depths[n], -n))
        path = []
        while node != ROOT:
            path.append(node)
            node = back[node]
        return path[::-1]


def build_lattice(model: Any, prompt_ids: Sequence[int], config: LatticeConfig, max_new_tokens: int
                  ) -> tuple[Lattice, int, list[int]]:
    """Steps 1-3 until the budget is spent: (G, merges, the first completion = greedy's nodes)."""
    lattice = Lattice.start()
    index: dict[tuple[int, tuple[int, ...]], int] = {}  # (depth, last n tokens) -> node
    frontier: list[tuple[float, int, int, int, float]] = []  # (-s, order, parent, token, log p)
    order = itertools.count()
    session = model.session()
    prompt = list(prompt_ids)
    if len(prompt) > 1:
        session.forward(prompt[:-1], all_logits=False)
    base = session.length
    calls, merges = 0, 0

    def key(parent: int, token: int) -> tuple[int, tuple[int, ...]]:
        tail = [*lattice.main_path(parent), token][-config.ngram:]
        return lattice.depths[parent] + 1, tuple(tail)

    def place(parent: int, token: int, logp: float) -> int | None:
        """Add the candidate, or merge it (step 2): None when merged."""
        nonlocal merges
        place_key = key(parent, token)
        found = index.get(place_key)
        if found is not None:
            lattice.edges.append((parent, found, logp, True))
            merges += 1
            return None
        node = lattice.add(parent, token, logp)
        index[place_key] = node
        return node

    def complete(node: int) -> None:
        """Step 3: depth-first greedy completion from `node`, pushing runner-ups."""
        nonlocal calls
        session.crop(base)
        inputs = [prompt[-1], *lattice.main_path(node)]
        while calls < config.expansions:
            logp = torch.log_softmax(session.forward(inputs, all_logits=False)[-1].float(), dim=-1)
            calls += 1
            top = torch.topk(logp, min(config.branching + 1, logp.shape[-1]))
            ids, values = top.indices.tolist(), top.values.tolist()
            for token, value in zip(ids[1:], values[1:], strict=True):
                heapq.heappush(frontier, (-(lattice.scores[node] + value), next(order), node, token, value))
            child = place(node, ids[0], values[0])
            if child is None:
                return
            node, inputs = child, [ids[0]]
            if ids[0] in model.eos_token_ids or lattice.depths[node] >= max_new_tokens:
                lattice.terminal[node] = True
                return
        lattice.terminal[node] = True  # the budget ran out mid-path: it ends here

    complete(ROOT)
    greedy_nodes = list(range(1, len(lattice.tokens)))  # the first completion is the greedy path
    while frontier and calls < config.expansions:
        _, _, parent, token, logp = heapq.heappop(frontier)  # step 1
        node = place(parent, token, logp)
        if node is None:
            continue
        if token in model.eos_token_ids or lattice.depths[node] >= max_new_tokens:
            lattice.terminal[node] = True
            continue
        complete(node)
    return lattice, merges, greedy_nodes


@register("lattice", LatticeConfig, "lattice decoding: best-first search with hypothesis recombination",
          needs_budget=True, family="search",
          paper="Xu, Jonnalagadda, Durrett 2022, lattice decoding, arXiv:2112.07660")
def run(model: Any, prompt_ids: Sequence[int], config: LatticeConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    lattice, merges, greedy_nodes = build_lattice(model, prompt_ids, config, max_new_tokens)
    chosen = lattice.best_path()
    yield LatticeResult(tokens=lattice.tokens, texts=[model.piece(t) if t >= 0 else "" for t in lattice.tokens],
                        depths=lattice.depths, edge_from=[e[0] for e in lattice.edges],
                        edge_to=[e[1] for e in lattice.edges], edge_logprobs=[round(e[2], 6) for e in lattice.edges],
                        edge_merged=[e[3] for e in lattice.edges],
                        terminal=[n for n, end in enumerate(lattice.terminal) if end],
                        path_count=lattice.path_count(), merges=merges, chosen=chosen, greedy=greedy_nodes)
    tokens = [lattice.tokens[n] for n in chosen]
    session = model.session()  # commit the chosen path with the distributions it is scored under
    logits = session.forward([*prompt_ids, *tokens], all_logits=True)  # (prompt + path, vocab)
    rows = logits[len(prompt_ids) - 1:]
    for step, token in enumerate(tokens):
        yield commit_token(model, step, len(prompt_ids) + step, token, rows[step])
