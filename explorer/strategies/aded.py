"""ADED: adaptive draft-verification with a tri-gram matrix and an MCTS draft maker (Liu, Lei, Zhang, Xu 2024,
"Adaptive Draft-Verification for Efficient Large Language Model Decoding", arXiv:2407.12021), as the authors'
code does it (liuxukun2000/Adaptix, DraftRetriever/src/lib.rs: Reader::search and mcts_sub.rs: MCTS::run).

Notation: M = the tri-gram matrix, M[a, b] = a row of weights over the tokens c that follow a, b (unnormalised once
adapted); s = a search node, whose state is the pair (a, b) of its last two tokens; N(s), W(s) = its visits and
summed value, Q(s) = W(s) / N(s); P(s) = M[parent's pair][s's token], the weight when s was added; S = simulations
per round; D = searched depth below the root; c1, c2 = the PUCT constants.
0. The LLM representative: M holds tri-gram weights (the authors build it from a corpus, normalise each row and
   keep its 12 heaviest successors). Departure: there is no corpus here, so M starts from the prompt's tri-grams,
   normalised and pruned the same way; `keep_table` keeps M across runs of one model, as the authors' process does.
1. Adaptation, every round before the search: +0.04 to each tri-gram among the last 16 context tokens (the one
   ending at the newest token included), each weight capped at 3.0.
2. Draft maker, S simulations from the root (the last two context tokens). Selection descends to the child with
   the highest PUCT(s) = Q(s) + (c1 + ln((N(p) + c2 + 1) / c2)) P(s) sqrt(N(p)) / (1 + N(s)), p = the parent
   (an unvisited child scores +inf), while the node has children and is above depth D; expansion adds every
   successor in the leaf's row at once; a random rollout then samples successors from M (proportional to their
   weights) until the path holds D tokens; its value 1 + the sum of the M weights of the tokens it took is added
   to every node on the path back to the root.
3. Drafts: the paths to the `paths` most visited nodes (the root takes one of those places), each extended by
   its row's argmax; the paths with the most distinct tokens are dropped first until the distinct tokens left
   fit `budget`; the rest merge into one tree, verified in one tree-masked pass (point masses: exact under both
   rules). A node that is not its row's argmax is flagged "explore".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.events import Event, PoolUpdate
from explorer.params import param
from explorer.strategies.base import register, tree_prepare
from explorer.strategies.draft_verify import Drafter, DraftTree, SpeculativeConfig, draft_verify

TABLES: dict[str, TrigramMatrix] = {}  # keep_table: model -> its matrix, across runs
STEP, WINDOW, CAP = 0.04, 16, 3.0  # step 1 (Reader::search)
ROW_KEEP = 12  # successors kept per row of the starting matrix (Reader::new)


@dataclass(frozen=True)
class AdedConfig(SpeculativeConfig):
    simulations: int = param(150, "MCTS simulations per round S", minimum=1, maximum=1024, step=1)
    depth: int = param(3, "searched depth D below the root (a draft adds its row's argmax: D + 1 tokens)",
                       minimum=1, maximum=8, step=1)
    paths: int = param(24, "drafts come from the paths to this many most visited nodes (the root is one)",
                       minimum=2, maximum=128, step=1)
    budget: int = param(64, "distinct draft tokens at most (the authors' choices); also the tree's node limit",
                        minimum=1, maximum=64, step=1)
    exploration: float = param(32.0, "PUCT constant c1 (the authors' first release used 1.814)", minimum=0.0,
                               maximum=100.0, step=0.1)
    c2: float = param(8.0, "PUCT constant c2 in c1 + ln((N + c2 + 1) / c2)", minimum=0.1, maximum=100.0, step=0.1)
    keep_table: bool = param(False, "start from (and keep) the matrix earlier runs of this model built in this "
                                    "process", crosses_runs=True)

    def draft_nodes(self) -> int:
        return self.budget


@dataclass
class TrigramMatrix:
    """M[(a, b)] -> {c: weight}."""

    rows: dict[tuple[int, int], dict[int, float]] = field(default_factory=dict)

    def row(self, a: int, b: int) -> dict[int, float]:
        return self.rows.get((a, b), {})

    def best(self, a: int, b: int) -> int | None:
        """The row's argmax (ties: the smaller token id); None for an empty row."""
        row = self.row(a, b)
        return min(row, key=lambda c: (-row[c], c)) if row else None

    def seed(self, tokens: Sequence[int]) -> None:
        """Step 0 (departure: the prompt stands in for the authors' corpus): tri-gram counts, normalised per row,
        the ROW_KEEP heaviest successors kept. Rows the matrix already has (a kept table) stay as they are."""
        counts: dict[tuple[int, int], dict[int, float]] = {}
        for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
            row = counts.setdefault((int(a), int(b)), {})
            row[int(c)] = row.get(int(c), 0.0) + 1.0
        for key, row in counts.items():
            if key not in self.rows:
                total = sum(row.values())
                self.rows[key] = {c: w / total for c, w in sorted(row.items(), key=lambda i: (-i[1], i[0]))[:ROW_KEEP]}

    def adapt(self, context: Sequence[int]) -> list[tuple[int, int]]:
        """Step 1: +STEP to every tri-gram among the last WINDOW context tokens, capped at CAP; the rows touched."""
        window = [int(t) for t in context[-WINDOW:]]
        touched = []
        for a, b, c in zip(window, window[1:], window[2:], strict=False):
            row = self.rows.setdefault((a, b), {})
            row[c] = min(CAP, row.get(c, 0.0) + STEP)
            touched.append((a, b))
        return touched


def puct(value: float, visits: int, prior: float, parent_visits: int, c1: float, c2: float) -> float:
    """Q(s) + (c1 + ln((N(p) + c2 + 1) / c2)) P(s) sqrt(N(p)) / (1 + N(s)); +inf before s's first visit
    (mcts_sub.rs: Node::putc_score)."""
    if visits == 0:
        return math.inf
    explore = c1 + math.log((parent_visits + c2 + 1) / c2)
    return value / visits + explore * prior * math.sqrt(parent_visits) / (1 + visits)


@dataclass
class Node:
    pair: tuple[int, int]  # its last two tokens: the row its children come from
    parent: int  # index in the search's node list, -1 for the root
    prior: float  # P(s)
    depth: int
    children: list[int] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0


def successors(matrix: TrigramMatrix, pair: tuple[int, int]) -> list[tuple[int, float]]:
    """A row's entries, heaviest first (ties: smaller token id): the order children are added in."""
    return sorted(matrix.row(*pair).items(), key=lambda item: (-item[1], item[0]))


def search(matrix: TrigramMatrix, context: Sequence[int], simulations: int, depth: int, c1: float, c2: float,
           draws: Iterator[float]) -> list[Node]:
    """Step 2: the search tree after S simulations (nodes[0] = the root); `draws` are uniforms for rollouts."""
    nodes = [Node((int(context[-2]) if len(context) > 1 else -1, int(context[-1])), -1, 0.0, 0)]
    for _ in range(simulations):
        node = 0
        while nodes[node].children and nodes[node].depth < depth:  # selection (max: ties go to the likelier)
            parent = nodes[node]
            node = max(parent.children, key=lambda i: puct(nodes[i].value, nodes[i].visits, nodes[i].prior,
                                                           parent.visits, c1, c2))
        leaf = nodes[node]
        if not leaf.children and leaf.depth < depth and matrix.row(*leaf.pair):  # expansion: the whole row
            for token, weight in successors(matrix, leaf.pair):
                leaf.children.append(len(nodes))
                nodes.append(Node((leaf.pair[1], token), node, weight, leaf.depth + 1))
            # Departure (tie order only): the authors roll out from the last child of a HashMap (arbitrary
            # order); here from the heaviest
            node = leaf.children[0]
        pairs = [nodes[node].pair]
        value, cursor = 1.0, node  # the value adds the weight of every token the path takes
        while cursor > 0:
            value += nodes[cursor].prior
            cursor = nodes[cursor].parent
        while nodes[node].depth + len(pairs) - 1 < depth:  # rollout
            row = successors(matrix, pairs[-1])
            if not row:
                break
            u, total, token = next(draws) * sum(w for _, w in row), 0.0, row[-1][0]
            for candidate, weight in row:
                total += weight
                if u <= total:
                    token = candidate
                    break
            value += matrix.row(*pairs[-1])[token]
            pairs.append((pairs[-1][1], token))
        cursor = node
        while cursor >= 0:  # backpropagation
            nodes[cursor].visits += 1
            nodes[cursor].value += value
            cursor = nodes[cursor].parent
    return nodes


def drafts(matrix: TrigramMatrix, nodes: list[Node], paths: int, budget: int) -> list[list[int]]:
    """Step 3: the draft paths (the root's token left out), most visited first."""
    order: list[int] = []
    stack = [0]
    while stack:  # depth-first, children in the order they were added
        order.append(stack.pop())
        stack.extend(reversed(nodes[order[-1]].children))
    ranked = sorted(order, key=lambda i: -nodes[i].visits)[:paths]  # stable: ties keep the depth-first order
    found: list[list[int]] = []
    for index in ranked:
        pair = nodes[index].pair  # the row its argmax extension comes from
        tokens: list[int] = []
        while index > 0:
            tokens.append(nodes[index].pair[1])
            index = nodes[index].parent
        if not tokens:
            continue  # the root's own path (it took one of the places, as in the authors' code)
        tokens.reverse()
        extra = matrix.best(*pair)
        path = tokens if extra is None else [*tokens, extra]
        if path not in found:
            found.append(path)
    return cut(found, budget)


def cut(paths: list[list[int]], budget: int) -> list[list[int]]:
    """Drop the paths with the most distinct tokens first until the distinct tokens left (summed over paths) fit
    `budget` (lib.rs: cut_to_choices)."""
    total = sum(len(set(p)) for p in paths)
    dropped = set()
    for i in sorted(range(len(paths)), key=lambda i: -len(set(paths[i]))):
        if total <= budget:
            break
        total -= len(set(paths[i]))
        dropped.add(i)
    return [p for i, p in enumerate(paths) if i not in dropped]


def merge(paths: list[list[int]], limit: int) -> tuple[list[int], list[int]]:
    """One tree node per distinct prefix, in depth order (first seen first), cut to `limit` nodes: (tokens,
    parents)."""
    index: dict[tuple[int, ...], int] = {}
    for depth in range(1, max((len(p) for p in paths), default=0) + 1):
        for p in paths:
            if len(p) >= depth and tuple(p[:depth]) not in index and len(index) < limit:
                index[tuple(p[:depth])] = len(index)
    tokens = [prefix[-1] for prefix in index]
    parents = [index[prefix[:-1]] if len(prefix) > 1 else -1 for prefix in index]
    return tokens, parents


class AdedDrafter(Drafter):
    name = "ADED"

    def __init__(self, config: AdedConfig, rng: torch.Generator, matrix: TrigramMatrix | None = None):
        self.config, self.rng = config, rng
        self.matrix = matrix if matrix is not None else TrigramMatrix()
        self._seeded = False
        self._touched: list[tuple[int, int]] = []

    def propose(self, context: Sequence[int]) -> DraftTree:
        config = self.config
        if not self._seeded:
            self.matrix.seed(context)  # step 0 (departure: the prompt stands in for the corpus)
            self._seeded = True
        self._touched = self.matrix.adapt(context)  # 1.
        draws = iter(torch.rand(config.simulations * config.depth, generator=self.rng).tolist())
        nodes = search(self.matrix, context, config.simulations, config.depth, config.exploration, config.c2,
                       draws)  # 2.
        tokens, parents = merge(drafts(self.matrix, nodes, config.paths, config.budget), config.budget)  # 3.
        # Departure: with nothing to draft the round is a plain step (the authors draft token id 100)
        before = [int(context[-2]) if len(context) > 1 else -1, int(context[-1])]
        explore = []
        for i, token in enumerate(tokens):
            pair = (before[0], before[1]) if parents[i] < 0 else (
                before[1] if parents[parents[i]] < 0 else tokens[parents[parents[i]]], tokens[parents[i]])
            explore.append(token != self.matrix.best(*pair))
        tree = DraftTree(tokens, parents, [1.0] * len(tokens), None, mode="point")
        tree.details.update(nodes=float(len(tokens)), matrix_rows=float(len(self.matrix.rows)),
                            explore_nodes=float(sum(explore)), search_nodes=float(len(nodes) - 1))
        tree.details["explore_mask"] = ",".join("1" if flag else "0" for flag in explore)
        return tree

    def drain_events(self, round_index: int, piece: Callable[[int], str]) -> list[Event]:
        touched, self._touched = self._touched, []
        if not touched:
            return []
        heads = {b: [c for c, _ in successors(self.matrix, (a, b))[:3]] for a, b in touched}
        return [PoolUpdate(round=round_index, source="ADED tri-gram matrix", heads=list(heads),
                           head_texts=[piece(h) for h in heads], continuations=list(heads.values()),
                           continuation_texts=[[piece(t) for t in c] for c in heads.values()],
                           pool_size=len(self.matrix.rows))]


@register("aded", AdedConfig, "ADED: tri-gram matrix drafts built by MCTS (PUCT), adapted online",
          prepare=tree_prepare, family="speed-up: model-free",
          paper="Liu et al. 2024, ADED, arXiv:2407.12021",
          reference_code="liuxukun2000/Adaptix: DraftRetriever/src/lib.rs: Reader::search, cut_to_choices; "
                         "DraftRetriever/src/mcts_sub.rs: MCTS::run, Node::putc_score",
          departures=(
              "no corpus: the matrix starts from the prompt's tri-grams (normalised per row, 12 successors kept, "
              "as the authors' Writer::finalize and Reader::new treat their corpus)",
              "the matrix is dropped after each run unless keep_table is on (the authors' Reader keeps adapting "
              "across every prompt of a process)",
              "rollout value = 1 + the M weights of the tokens taken; the authors' MCTS::run reads "
              "M[state_i][state_{i+1}.0] (the weight of repeating the middle token), which looks like an index slip",
              "ties are broken by weight then token id (the authors' HashMap order is arbitrary), and the rollout "
              "after an expansion starts from the heaviest child, not the last one",
              "rollouts draw from the run's seeded generator, not thread_rng",
              "an empty draft is a plain step (the authors draft token id 100); the tree holds at most budget "
              "nodes (the authors: 64, their default choices)",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: AdedConfig, rng: torch.Generator) -> Iterator[Event]:
    matrix = (TABLES.setdefault(f"{model.info.model_id}@{model.info.weights_hash}", TrigramMatrix())
              if config.keep_table else None)
    yield from draft_verify(model, prompt_ids, AdedDrafter(config, rng, matrix), config, rng)
