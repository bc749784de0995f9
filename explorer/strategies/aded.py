"""ADED: adaptive draft-verification with a tri-gram matrix and an MCTS-style draft maker (Liu, Lei, Zhang, Xu
2024, "Adaptive Draft-Verification for Efficient Large Language Model Decoding", arXiv:2407.12021).

Notation: M = the tri-gram matrix, M[a, b] a row of weights over next tokens c; P(c | a, b) = M[a, b, c] /
sum_c M[a, b, c] (backing off to the bigram row B[b] while M[a, b] is empty); N(s), W(s) = visit count and
summed value of draft node s; Q(s) = W(s) / N(s); c_puct = exploration weight; S = simulations per round;
D = maximum depth; budget = draft nodes.
1. The LLM representative (adaptation): M starts from the prompt's tri-grams and is updated after every target
   pass with the target's own output distribution (the top `candidates` probabilities at every verified
   position are added to the row of the two tokens before it) and with every committed tri-gram (+1), so it
   tracks the model's outputs as decoding proceeds. `keep_table` keeps M across runs of one model.
2. Draft maker (exploration vs exploitation): S simulations from the last two committed tokens. Each descends
   by PUCT, argmax over children c of Q(c) + c_puct P(c | parent) sqrt(N(parent)) / (1 + N(c)), over the top
   `candidates` continuations of the parent's row; an unvisited child is added (while the budget lasts) and
   valued by its path probability prod P under M (the chance the draft reaches it); the value is backed up
   along the path. The draft tree is every node added; a node that is not its parent's most probable child
   is flagged "explore".
3. Verify the tree in one tree-masked pass (point masses: exact under both rules), commit, update M (step 1).
Departure: the paper's text we could read gives the representation, the PUCT-guided draft maker and the
update loop, not every constant; the value (path probability under M), the soft update with the target's
top-k and the prompt initialisation are our reading of them, marked here.
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


@dataclass(frozen=True)
class AdedConfig(SpeculativeConfig):
    simulations: int = param(32, "MCTS simulations per round S", minimum=1, maximum=256, step=1)
    budget: int = param(12, "draft tree nodes at most", minimum=1, maximum=64, step=1)
    depth: int = param(5, "draft depth at most D", minimum=1, maximum=12, step=1)
    exploration: float = param(1.0, "PUCT exploration weight c_puct", minimum=0.0, maximum=10.0, step=0.1)
    candidates: int = param(8, "continuations per matrix row considered (and target top-k recorded)", minimum=1,
                            maximum=32, step=1)
    keep_table: bool = param(False, "start from (and keep) the matrix earlier runs of this model built in this "
                                    "process", crosses_runs=True)

    def draft_nodes(self) -> int:
        return self.budget


@dataclass
class TrigramMatrix:
    """M[a, b] -> {c: weight} and the bigram back-off B[b] -> {c: weight}."""

    rows: dict[tuple[int, int], dict[int, float]] = field(default_factory=dict)
    bigrams: dict[int, dict[int, float]] = field(default_factory=dict)

    def add(self, a: int, b: int, c: int, weight: float) -> None:
        row = self.rows.setdefault((a, b), {})
        row[c] = row.get(c, 0.0) + weight
        back = self.bigrams.setdefault(b, {})
        back[c] = back.get(c, 0.0) + weight

    def add_text(self, tokens: Sequence[int]) -> None:
        for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
            self.add(int(a), int(b), int(c), 1.0)

    def prior(self, a: int, b: int, k: int) -> list[tuple[int, float]]:
        """The k most likely next tokens after (a, b) with P(c | a, b) (bigram back-off), best first."""
        row = self.rows.get((a, b)) or self.bigrams.get(b) or {}
        total = sum(row.values())
        best = sorted(row.items(), key=lambda item: (-item[1], item[0]))[:k]
        return [(c, w / total) for c, w in best] if total > 0 else []


@dataclass
class _Node:
    token: int
    parent: int  # index in the draft (-1: the root)
    prior: float  # P(token | the two tokens before it)
    path_probability: float
    explore: bool
    visits: int = 0
    value: float = 0.0


def puct_tree(matrix: TrigramMatrix, context: Sequence[int], simulations: int, budget: int, depth: int,
              exploration: float, k: int) -> list[_Node]:
    """Step 2: the nodes the PUCT simulations added, parents before children."""
    nodes: list[_Node] = []
    kids: dict[int, dict[int, int]] = {}  # node -> {token: child node}
    root_visits = 0
    last_two = (int(context[-2]) if len(context) > 1 else -1, int(context[-1]))

    def history(node: int) -> tuple[int, int]:
        """The two tokens that end at `node` (the row of M its children come from)."""
        if node < 0:
            return last_two
        parent = nodes[node].parent
        return (last_two[1] if parent < 0 else nodes[parent].token), nodes[node].token

    for _ in range(simulations):
        path: list[int] = []
        node, visits, probability = -1, root_visits, 1.0
        added = False
        for _level in range(depth):
            a, b = history(node)
            options = matrix.prior(a, b, k)
            if not options:
                break
            best_token = options[0][0]
            scored = []
            for token, prior in options:
                child = kids.get(node, {}).get(token)
                q = nodes[child].value / nodes[child].visits if child is not None and nodes[child].visits else 0.0
                n = nodes[child].visits if child is not None else 0
                scored.append((q + exploration * prior * math.sqrt(visits + 1) / (1 + n), token, prior, child))
            _, token, prior, child = max(scored, key=lambda item: (item[0], item[2]))  # ties: the likelier
            probability *= prior
            if child is None:
                if len(nodes) >= budget:
                    break
                nodes.append(_Node(token, node, prior, probability, explore=token != best_token))
                child = len(nodes) - 1
                kids.setdefault(node, {})[token] = child
                path.append(child)
                added = True
                break  # a new leaf is valued, not descended
            path.append(child)
            node, visits = child, nodes[child].visits
        value = nodes[path[-1]].path_probability if path else 0.0
        for step in path:
            nodes[step].visits += 1
            nodes[step].value += value
        root_visits += 1
        if not added and not path:
            break  # nothing to expand from the root
    return nodes


class AdedDrafter(Drafter):
    name = "ADED"
    watches_logits = True  # every target pass updates the matrix

    def __init__(self, config: AdedConfig, matrix: TrigramMatrix | None = None):
        self.config = config
        self.matrix = matrix if matrix is not None else TrigramMatrix()
        self._seeded = False
        self._context: list[int] = []
        self._changed: dict[int, list[int]] = {}

    def observe_logits(self, inputs: Sequence[int], logits: torch.Tensor, parents: Sequence[int] | None) -> None:
        """Step 1: the target's top-k at each position, added to the row of the two tokens before it."""
        if not self._seeded:  # the first pass (the prefill): the prompt's tri-grams
            self.matrix.add_text(inputs)
            self._seeded, before = True, -1
        else:  # a verification: inputs = [last committed token, draft...]
            before = self._context[-2] if len(self._context) > 1 else -1
        top = torch.topk(torch.softmax(logits.float(), dim=-1), min(self.config.candidates, logits.shape[-1]), dim=-1)
        tree = parents if parents is not None else [-1, *range(len(inputs) - 1)]
        for i, token in enumerate(inputs):
            a = int(inputs[tree[i]]) if tree[i] >= 0 else before
            for c, weight in zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True):
                self.matrix.add(a, int(token), int(c), float(weight))
            self._changed[int(token)] = top.indices[i].tolist()[:3]

    def propose(self, context: Sequence[int]) -> DraftTree:
        if self._context and list(context[: len(self._context)]) == self._context:
            self.matrix.add_text(list(context[max(0, len(self._context) - 2):]))  # committed tri-grams (+1)
        self._context = list(context)
        nodes = puct_tree(self.matrix, context, self.config.simulations, self.config.budget, self.config.depth,
                          self.config.exploration, self.config.candidates)
        tree = DraftTree([n.token for n in nodes], [n.parent for n in nodes], [1.0] * len(nodes), None, mode="point")
        tree.details.update(nodes=float(len(nodes)), matrix_rows=float(len(self.matrix.rows)),
                            explore_nodes=float(sum(n.explore for n in nodes)))
        tree.details["explore_mask"] = ",".join("1" if n.explore else "0" for n in nodes)
        return tree

    def drain_events(self, round_index: int, piece: Callable[[int], str]) -> list[Event]:
        changed, self._changed = self._changed, {}
        if not changed:
            return []
        return [PoolUpdate(round=round_index, source="ADED tri-gram matrix", heads=list(changed),
                           head_texts=[piece(h) for h in changed], continuations=list(changed.values()),
                           continuation_texts=[[piece(t) for t in c] for c in changed.values()],
                           pool_size=len(self.matrix.rows))]


@register("aded", AdedConfig, "ADED: tri-gram matrix drafts built by PUCT search, adapted online",
          prepare=tree_prepare, family="speed-up: model-free",
          paper="Liu et al. 2024, ADED, arXiv:2407.12021")
def run(model: Any, prompt_ids: Sequence[int], config: AdedConfig, rng: torch.Generator) -> Iterator[Event]:
    matrix = (TABLES.setdefault(f"{model.info.model_id}@{model.info.weights_hash}", TrigramMatrix())
              if config.keep_table else None)
    yield from draft_verify(model, prompt_ids, AdedDrafter(config, matrix), config, rng)
