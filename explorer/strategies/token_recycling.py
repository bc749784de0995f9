"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference of Large Language
Models with Token Recycling", arXiv:2408.08696).

Every target pass yields, at each position, a distribution whose runner-up tokens are normally thrown away.
Token Recycling keeps them: an adjacency table M[t] = the k most likely next tokens seen the last time token t
was an input (updated after every pass, prompt included). A draft tree is read off M breadth-first from the
last committed token along a static tree shape (`tree`):
- "template" (default): the paper's kind of static tree, 79 nodes over 6 levels, in which a higher-ranked child
  gets more branches: the root has B_0 = 8 children; a node that is its parent's r-th best child (r = 0, 1, ...)
  at depth d has max(0, B_d - r) children, B = (8, 6, 2, 1, 1, 1) (levels of 8, 21, 17, 11, 11, 11 nodes).
  Departure: the authors ship a hand-tuned 80-node, 6-level template; ours follows its principle from a rule.
- "widths": `widths[d]` children for every node at depth d (uniform; a small one pays better on a CPU).
The tree is deterministic (point masses), so it is verified exactly by either rule, in one pass.
The paper keeps M across requests to the same model; `keep_table` does so (a table per model in this process,
shared by every run with the switch on), so a run starts warm from what earlier runs recycled.

Authors' code: Luowaterbi/TokenRecycling evaluation/inference_recycling.py (recycling_forward) and
model/recycling/tree_template_.py (template "2.2.2": 80 nodes, levels 8, 21, 25, 15, 8, 3). Departures besides the
template: keep_table is off by default (the authors keep one matrix across all requests); the prompt pass updates
the table (the authors update it from the tree passes only); a node whose parent token has no entry is left out
(the authors' matrix starts at zeros, so it drafts token 0); the sampling rule is ours (their code is greedy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, PoolUpdate
from explorer.params import param
from explorer.strategies.base import register, tree_prepare
from explorer.strategies.draft_verify import Drafter, DraftTree, SpeculativeConfig, draft_verify
from explorer.trees import parse_widths, uniform_tree_size

TREES = ("template", "widths")
TEMPLATE_BASES = (8, 6, 2, 1, 1, 1)  # B_d: children of a depth-d node that is its parent's best child
TABLES: dict[str, dict[int, list[int]]] = {}  # keep_table: model -> its adjacency table, across runs


def template_shape(bases: Sequence[int] = TEMPLATE_BASES) -> tuple[list[int], list[int]]:
    """The static template as (parents, rank of each node among its siblings), breadth-first."""
    parents: list[int] = []
    ranks: list[int] = []
    frontier = [(-1, 0)]
    for depth, base in enumerate(bases):
        new = []
        for node, rank in frontier:
            for child_rank in range(base if depth == 0 else max(0, base - rank)):
                parents.append(node)
                ranks.append(child_rank)
                new.append((len(parents) - 1, child_rank))
        frontier = new
    return parents, ranks


@dataclass(frozen=True)
class TokenRecyclingConfig(SpeculativeConfig):
    tree: str = param("template", "template: the paper's kind of 79-node static tree; widths: uniform widths below",
                      choices=TREES)
    widths: str = param("2,2,1,1", "tree=widths: children per node at each depth, e.g. '3,2,1'")
    candidates: int = param(8, "top-k tokens kept per entry of the adjacency table", minimum=1, maximum=32, step=1)
    keep_table: bool = param(False, "start from (and keep) the table earlier runs of this model built in this "
                                    "process, as the paper does", crosses_runs=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = parse_widths(self.widths)
        if self.tree == "widths" and max(widths) > self.candidates:
            raise ValueError("a tree width cannot exceed the number of candidates kept per token")
        if self.tree == "template" and TEMPLATE_BASES[0] > self.candidates:
            raise ValueError(f"the template needs candidates >= {TEMPLATE_BASES[0]}")

    def draft_nodes(self) -> int:
        """The tree's size when every entry is filled."""
        if self.tree == "template":
            return len(template_shape()[0])
        return uniform_tree_size(parse_widths(self.widths))


class RecyclingDrafter(Drafter):
    name = "token recycling"
    watches_logits = True  # every target pass refreshes the adjacency table

    def __init__(self, config: TokenRecyclingConfig, table: dict[int, list[int]] | None = None):
        self.widths = parse_widths(config.widths)
        self.template = template_shape() if config.tree == "template" else None
        self.k = config.candidates
        # token -> its recycled next-token candidates, best first
        self.adjacency: dict[int, list[int]] = table if table is not None else {}
        self._changed: dict[int, list[int]] = {}

    def observe_logits(self, inputs: Sequence[int], logits: torch.Tensor, parents: Sequence[int] | None) -> None:
        """Recycle every position's top-k: the distribution after input token t updates M[t]."""
        top = torch.topk(logits, min(self.k, logits.shape[-1]), dim=-1).indices.tolist()
        for token, candidates in zip(inputs, top, strict=True):
            if self.adjacency.get(int(token)) != candidates:
                self.adjacency[int(token)] = candidates
                self._changed[int(token)] = candidates

    def drain_events(self, round_index: int, piece: Callable[[int], str]) -> list[Event]:
        changed, self._changed = self._changed, {}
        if not changed:
            return []
        return [PoolUpdate(round=round_index, source="token recycling", heads=list(changed),
                           head_texts=[piece(h) for h in changed], continuations=list(changed.values()),
                           continuation_texts=[[piece(t) for t in c] for c in changed.values()],
                           pool_size=len(self.adjacency))]

    def propose(self, context: Sequence[int]) -> DraftTree:
        if self.template is not None:
            return self._from_template(context)
        tokens: list[int] = []
        parents: list[int] = []
        frontier = [(-1, context[-1])]
        for width in self.widths:
            new = []
            for node, token in frontier:
                for child in self.adjacency.get(token, [])[:width]:
                    tokens.append(child)
                    parents.append(node)
                    new.append((len(tokens) - 1, child))
            frontier = new
        return self._tree(tokens, parents)

    def _from_template(self, context: Sequence[int]) -> DraftTree:
        """Fill the template top-down: a node of rank r is its parent token's r-th candidate in M (a node whose
        parent has no entry, or too few candidates, is left out with its subtree)."""
        template_parents, ranks = self.template
        placed: dict[int, int] = {}  # template node -> tree node
        tokens: list[int] = []
        parents: list[int] = []
        for node, (parent, rank) in enumerate(zip(template_parents, ranks, strict=True)):
            if parent >= 0 and parent not in placed:
                continue
            head = context[-1] if parent < 0 else tokens[placed[parent]]
            candidates = self.adjacency.get(head, [])
            if rank < len(candidates):
                placed[node] = len(tokens)
                tokens.append(candidates[rank])
                parents.append(-1 if parent < 0 else placed[parent])
        return self._tree(tokens, parents)

    def _tree(self, tokens: list[int], parents: list[int]) -> DraftTree:
        tree = DraftTree(tokens, parents, [1.0] * len(tokens), None, mode="point")
        tree.details.update(nodes=float(len(tokens)), table_entries=float(len(self.adjacency)))
        return tree


@register("token_recycling", TokenRecyclingConfig, "Token Recycling: draft trees from recycled top-k candidates",
          prepare=tree_prepare,
          family="speed-up: model-free",
          paper="Luo et al. 2024, Token Recycling, arXiv:2408.08696",
          reference_code=("Luowaterbi/TokenRecycling: evaluation/inference_recycling.py: recycling_forward; "
                          "model/recycling/tree_template_.py: choose_tree_template"),
          departures=(
              "tree=template is a rule-built 79-node tree (levels 8, 21, 17, 11, 11, 11); the authors ship a "
              "hand-tuned 80-node template (2.2.2: levels 8, 21, 25, 15, 8, 3).",
              "The adjacency table is per run unless keep_table is on (off by default); the authors keep one matrix "
              "across all requests (hot start).",
              "The prompt pass updates the table too; the authors update it only from the draft-tree passes.",
              "A node whose parent token has no entry (or too few candidates) is left out; the authors' matrix "
              "starts at zeros, so such nodes draft token 0.",
              "The sampling rule (exact rejection over point masses) is ours; the authors' code is greedy only.",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: TokenRecyclingConfig, rng: torch.Generator
        ) -> Iterator[Event]:
    table = TABLES.setdefault(f"{model.info.model_id}@{model.info.weights_hash}", {}) if config.keep_table else None
    yield from draft_verify(model, prompt_ids, RecyclingDrafter(config, table), config, rng)
