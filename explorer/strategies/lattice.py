"""Lattice decoding: best-first search with hypothesis recombination (Xu, Jonnalagadda, Durrett 2022, "Massive-
scale Decoding for Text Generation using Lattices", arXiv:2112.07660), as the authors' RCB search runs it:
jiacheng-xu/lattice-generation, src/recom_search/model/model_bfs_zip.py: bfs_rcb_any and step_bfs_rcb_any
(with `-dfs_expand -merge rcb`), merge.py: similarity_heuristic, merge_strategy.py: merge_imp.

Notation: G = the lattice (nodes = tokens, edges = "this token can follow that one"; node 0 is the end of the
prompt and plays the decoder's start token); O = the search frontier; s(y) = Σ log p along a hypothesis y's
first path (each node's first parent); |y| = its length, start token included (the authors' `length`, with
their summarization prefix of one token); α = the length power (`avg_score`); k = runner-ups a step (`k_best`
− 1); n = the recombination n-gram size (`ngram_suffix`); L = the length window (`len_diff`).
1. Pop the candidate y with the best s(y) / |y|^α (s(y) when α = 0) from O and add it to G. A popped
   candidate is never merged itself, nor indexed: only top-1 continuations are (step 3).
2. Complete y depth-first: call the model, push the k runner-ups onto O (one that ends, by an end token or the
   length limit, joins G as a finished node at once; one whose text, stripped and lower-cased, repeats a better
   token's is skipped), and take the top-1 token y'.
3. Recombination (RCB) of y': look up the nodes v of G that end some n-token path (over every parent, merge
   edges included) with the last n tokens of y'. The first v whose first matching path (parents in order)
   differs in length from |y'| by less than L takes y': an edge joins y''s parent to v with log p(y' | y),
   y' is dropped and the completion stops (v's continuations now also continue y). The merge is refused
   (and no other v tried) when the parent is v or one already reaches the other. Otherwise y' joins G, every
   n-token path into it is indexed, and the completion goes on until an end token or the length limit.
The budget is the number of model calls (`expansions`); nothing is pruned, so G encodes many more complete
outputs than calls. A LatticeResult records G (positions = depth along each node's first path).
Departures (marked where they happen): RCB only (the authors' default merge is ZIP, which also merges the
matched n-gram's nodes backwards); the matched path is measured from its own first node (the authors'
BeamNodeFull.get_tokens_match_suffix restarts from v and counts v's whole path plus n, shifting the window by
n); the no-cycle check covers all of G (the authors' get_antecedent looks back 10 steps); the budget is hard
(the authors check it only between completions); a path ends at the model's end tokens or max_new_tokens (the
authors end at "." or "</s>" once 10 tokens long, and a completion runs on past max_len); the default budget
is 48 calls (the authors' runs: max_len × beam size, 35 × 16); the run commits one path, G's best by mean
log-probability within max_new_tokens (the authors return the lattice; their analysis ranks paths by mean,
evaluation/analysis.py: avg_score), scored along its edges (a merge edge carries the log p found on the
dropped hypothesis: the approximation recombination makes).
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict, deque
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
    branching: int = param(4, "k: runner-up tokens pushed onto the frontier at each step (authors: k_best 5 = "
                              "top-1 + 4)", minimum=1, maximum=8, step=1)
    ngram: int = param(4, "n: merge a continuation into a node that ends a path with the same last n tokens",
                       minimum=1, maximum=8, step=1)
    len_diff: int = param(5, "L: merge only when the two paths' lengths differ by less than L (1 = same length)",
                          minimum=1, maximum=32, step=1)
    length_power: float = param(0.75, "α: the frontier ranks runner-ups by s(y) / |y|^α (0 = the plain sum)",
                                minimum=0.0, maximum=2.0, step=0.05)


def frontier_score(score: float, length: int, power: float) -> float:
    """The authors' heap priority of a runner-up: s(y) / |y|^α, or s(y) when α = 0 (`avg_score` ≤ 0)."""
    return score / length ** power if power > 0 else score


@dataclass
class Lattice:
    """G as plain lists: node 0 is the end of the prompt."""

    tokens: list[int]
    depths: list[int]  # length of the node's first path (root excluded)
    main_parent: list[int]  # the node each node was first reached from
    parents: list[list[int]]  # every parent, first one first, then merge sources in the order they came
    scores: list[float]  # s(y) along the first path
    edges: list[tuple[int, int, float, bool]]  # (from, to, log p of `to`'s token there, merge?)
    terminal: list[bool]

    @classmethod
    def start(cls) -> Lattice:
        return cls([-1], [0], [-1], [[]], [0.0], [], [False])

    def main_path(self, node: int) -> list[int]:
        """The tokens of the node's first path (root excluded)."""
        tokens: list[int] = []
        while node != ROOT:
            tokens.append(self.tokens[node])
            node = self.main_parent[node]
        return tokens[::-1]

    def add(self, parent: int, token: int, logp: float) -> int:
        self.tokens.append(token)
        self.depths.append(self.depths[parent] + 1)
        self.main_parent.append(parent)
        self.parents.append([parent])
        self.scores.append(self.scores[parent] + logp)
        self.terminal.append(False)
        self.edges.append((parent, len(self.tokens) - 1, logp, False))
        return len(self.tokens) - 1

    def join(self, source: int, target: int, logp: float) -> None:
        """A merge edge (merge_strategy.py: merge_imp): `target` gains `source` as a parent."""
        self.parents[target].append(source)
        self.edges.append((source, target, logp, True))

    def ngrams(self, node: int, n: int) -> set[tuple[int, ...]]:
        """The tokens of every n-node path into `node` through any parent, root excluded (bfs_util.py:
        HashObject.add_helper)."""
        ends = {(node, (self.tokens[node],))}
        for _ in range(n - 1):
            ends = {(p, (self.tokens[p], *gram)) for top, gram in ends for p in self.parents[top] if p != ROOT}
        return {gram for _, gram in ends}

    def match_start(self, node: int, gram: Sequence[int]) -> int | None:
        """The first node of the first path into `node` (parents in order) whose tokens are `gram`."""
        if self.tokens[node] != gram[-1]:
            return None
        if len(gram) == 1:
            return node
        for parent in self.parents[node]:
            start = self.match_start(parent, gram[:-1]) if parent != ROOT else None
            if start is not None:
                return start
        return None

    def ancestors(self, node: int) -> set[int]:
        seen, todo = set(), [node]
        while todo:
            for parent in self.parents[todo.pop()]:
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return seen

    def topological_order(self) -> list[int]:
        """Merge edges may point to older nodes, so node ids are not an order: Kahn's algorithm."""
        indegree = [len(p) for p in self.parents]
        children: list[list[int]] = [[] for _ in self.tokens]
        for source, target, _, _ in self.edges:
            children[source].append(target)
        order, ready = [], deque(n for n, d in enumerate(indegree) if d == 0)
        while ready:
            order.append(node := ready.popleft())
            for child in children[node]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    ready.append(child)
        return order

    def path_count(self) -> int:
        """Distinct root-to-terminal paths."""
        count = [0] * len(self.tokens)
        count[ROOT] = 1
        outgoing = defaultdict(list)
        for source, target, _, _ in self.edges:
            outgoing[source].append(target)
        for node in self.topological_order():
            for target in outgoing[node]:
                count[target] += count[node]
        return sum(c for c, end in zip(count, self.terminal, strict=True) if end)

    def best_path(self, max_length: int | None = None) -> list[int]:
        """The terminal path with the best mean log-probability among those of at most `max_length` tokens
        (paths through merge edges differ in length, so Viterbi keeps the best sum per (node, length))."""
        outgoing = defaultdict(list)
        for source, target, logp, _ in self.edges:
            outgoing[source].append((target, logp))
        best: dict[tuple[int, int], tuple[float, tuple[int, int] | None]] = {(ROOT, 0): (0.0, None)}
        by_node: dict[int, list[int]] = defaultdict(list, {ROOT: [0]})
        for node in self.topological_order():
            for length in by_node[node]:
                score = best[node, length][0]
                if max_length is not None and length >= max_length:
                    continue
                for target, logp in outgoing[node]:
                    state = (target, length + 1)
                    if state not in best:
                        by_node[target].append(length + 1)
                    if state not in best or score + logp > best[state][0]:
                        best[state] = (score + logp, (node, length))
        ends = [(n, length) for (n, length) in best if n != ROOT and self.terminal[n]]
        state: tuple[int, int] | None = max(ends, key=lambda e: (best[e][0] / e[1], -e[0], -e[1]))
        path = []
        while state is not None and state[0] != ROOT:
            path.append(state[0])
            state = best[state][1]
        return path[::-1]


def build_lattice(model: Any, prompt_ids: Sequence[int], config: LatticeConfig, max_new_tokens: int
                  ) -> tuple[Lattice, int, list[int]]:
    """Steps 1-3 until the budget is spent: (G, merges, the first completion = greedy's nodes)."""
    lattice = Lattice.start()
    index: dict[tuple[int, ...], list[int]] = defaultdict(list)  # last n tokens -> nodes ending such a path
    frontier: list[tuple[float, int, int, int, float]] = []  # (-priority, order, parent, token, log p)
    order = itertools.count()
    session = model.session()
    prompt = list(prompt_ids)
    if len(prompt) > 1:
        session.forward(prompt[:-1], all_logits=False)
    base = session.length
    calls, merges = 0, 0

    def ends(token: int, depth: int) -> bool:
        # departure: the model's end tokens or max_new_tokens (authors: "." or "</s>" once 10 long)
        return token in model.eos_token_ids or depth >= max_new_tokens

    def merge_target(parent: int, token: int) -> int | None:
        """Step 3 for y' = parent's path + token: the node to merge into, or None (similarity_heuristic,
        merge_imp's refusals)."""
        depth = lattice.depths[parent] + 1
        if depth < config.ngram:  # |y'| must exceed n, the start token counted
            return None
        gram = tuple([*lattice.main_path(parent), token][-config.ngram:])
        # the authors' candidates come from a set; ours in the order they were indexed
        for node in index.get(gram, []):
            start = lattice.match_start(node, gram)
            if start is None:
                continue
            # departure: the matched path's own length (first path to its first node, then the n-gram)
            length = lattice.depths[start] + config.ngram - 1
            if abs(length - depth) >= config.len_diff:
                continue
            # the first similar candidate decides, as in the authors' loop; departure: reachability over all
            # of G (no cycle, no shortcut), where get_antecedent looks back 10 steps
            if node == parent or node in lattice.ancestors(parent) or parent in lattice.ancestors(node):
                return None
            return node
        return None

    def push_runner_ups(node: int, ids: list[int], values: list[float]) -> None:
        """Step 2: the k runner-ups onto O; a finished one joins G at once; repeated texts are skipped."""
        seen = {model.piece(ids[0]).strip().lower()}
        depth = lattice.depths[node] + 1
        for token, value in zip(ids[1:], values[1:], strict=True):
            text = model.piece(token).strip().lower()
            if text in seen:
                continue
            seen.add(text)
            if ends(token, depth):
                lattice.terminal[lattice.add(node, token, value)] = True
                continue
            priority = frontier_score(lattice.scores[node] + value, depth + 1, config.length_power)
            heapq.heappush(frontier, (-priority, next(order), node, token, value))

    def complete(node: int) -> list[int]:
        """Steps 2-3 from `node`: the nodes added along the top-1 path."""
        nonlocal calls, merges
        added: list[int] = []
        session.crop(base)
        inputs = [prompt[-1], *lattice.main_path(node)]
        while calls < config.expansions:
            logp = torch.log_softmax(session.forward(inputs, all_logits=False).logits[-1].float(), dim=-1)  # (vocab,)
            calls += 1
            top = torch.topk(logp, min(config.branching + 1, logp.shape[-1]))
            ids, values = top.indices.tolist(), top.values.tolist()
            push_runner_ups(node, ids, values)
            target = merge_target(node, ids[0])
            if target is not None:  # y' is dropped: its continuations are target's
                lattice.join(node, target, values[0])
                merges += 1
                return added
            child = lattice.add(node, ids[0], values[0])
            for gram in lattice.ngrams(child, config.ngram):
                index[gram].append(child)
            added.append(child)
            node, inputs = child, [ids[0]]
            if ends(ids[0], lattice.depths[node]):
                lattice.terminal[node] = True
                return added
        lattice.terminal[node] = True  # departure: the budget ran out mid-path, so it ends here
        return added

    greedy_nodes = complete(ROOT)  # the first completion is the greedy path
    while frontier and calls < config.expansions:
        _, _, parent, token, logp = heapq.heappop(frontier)  # step 1
        complete(lattice.add(parent, token, logp))
    return lattice, merges, greedy_nodes


@register("lattice", LatticeConfig, "lattice decoding: best-first search with hypothesis recombination",
          needs_budget=True, family="search",
          paper="Xu, Jonnalagadda, Durrett 2022, lattice decoding, arXiv:2112.07660",
          reference_code="jiacheng-xu/lattice-generation: src/recom_search/model/model_bfs_zip.py: bfs_rcb_any",
          departures=(
              "RCB merges only: the authors' default -merge zip (ZIP, merging the matched n-gram's nodes "
              "backwards) is not implemented",
              "the matched path's length is its own; the authors' BeamNodeFull.get_tokens_match_suffix counts the "
              "candidate's whole path plus n, shifting the len_diff window by n",
              "the merge refuses any cycle or shortcut over all of G; the authors' get_antecedent looks back 10 "
              "steps",
              "the budget is a hard limit on model calls; the authors check it only between completions",
              "a path ends at the model's end tokens or max_new_tokens; the authors end at '.' or '</s>' after 10 "
              "tokens, and a completion runs on past max_len",
              "default budget 48 model calls; the authors' runs use max_len x beam size (35 x 16 = 560)",
              "the run commits one path, G's best by mean log-probability within max_new_tokens; the authors "
              "return the lattice",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: LatticeConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    lattice, merges, greedy_nodes = build_lattice(model, prompt_ids, config, max_new_tokens)
    chosen = lattice.best_path(max_new_tokens)
    yield LatticeResult(tokens=lattice.tokens, texts=[model.piece(t) if t >= 0 else "" for t in lattice.tokens],
                        depths=lattice.depths, edge_from=[e[0] for e in lattice.edges],
                        edge_to=[e[1] for e in lattice.edges], edge_logprobs=[round(e[2], 6) for e in lattice.edges],
                        edge_merged=[e[3] for e in lattice.edges],
                        terminal=[n for n, end in enumerate(lattice.terminal) if end],
                        path_count=lattice.path_count(), merges=merges, chosen=chosen, greedy=greedy_nodes)
    tokens = [lattice.tokens[n] for n in chosen]
    session = model.session()  # commit the chosen path with the distributions it is scored under
    logits = session.forward([*prompt_ids, *tokens], all_logits=True).logits  # (prompt + path, vocab)
    rows = logits[len(prompt_ids) - 1:]
    for step, token in enumerate(tokens):
        yield commit_token(model, step, len(prompt_ids) + step, token, rows[step])
