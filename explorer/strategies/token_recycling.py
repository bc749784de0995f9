"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference of Large Language
Models with Token Recycling", arXiv:2408.08696).

Every target pass yields, at each position, a distribution whose runner-up tokens are normally thrown away.
Token Recycling keeps them: an adjacency table M[t] = the k most likely next tokens seen the last time token t
was an input (updated after every pass, prompt included). A draft tree is read off M breadth-first from the
last committed token, with `widths[d]` children per node at depth d (the paper uses a fixed static tree of
about 80 nodes on GPU; a small one pays better on a CPU). The tree is deterministic (point masses), so it is
verified exactly by either rule, in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, PoolUpdate
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_verify import Drafter, DraftTree, SpeculativeConfig, draft_verify


@dataclass(frozen=True)
class TokenRecyclingConfig(SpeculativeConfig):
    widths: str = param("2,2,1,1", "children per node at each depth, e.g. '3,2,1'")
    candidates: int = param(8, "top-k tokens kept per entry of the adjacency table", minimum=1, maximum=32, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = parse_widths(self.widths)
        if max(widths) > self.candidates:
            raise ValueError("a tree width cannot exceed the number of candidates kept per token")

    def draft_nodes(self) -> int:
        """widths[0] + widths[0]·widths[1] + ...: the tree's size when every entry is filled."""
        nodes, level = 0, 1
        for width in parse_widths(self.widths):
            level *= width
            nodes += level
        return nodes


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"widths must be comma-separated counts like '2,2,1', got {text!r}") from None
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be comma-separated counts >= 1 like '2,2,1', got {text!r}")
    return widths


class RecyclingDrafter(Drafter):
    name = "token recycling"
    watches_logits = True  # every target pass refreshes the adjacency table

    def __init__(self, config: TokenRecyclingConfig):
        self.widths = parse_widths(config.widths)
        self.k = config.candidates
        self.adjacency: dict[int, list[int]] = {}  # token -> its recycled next-token candidates, best first
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
        tree = DraftTree(tokens, parents, [1.0] * len(tokens), None, mode="point")
        tree.details.update(nodes=float(len(tokens)), table_entries=float(len(self.adjacency)))
        return tree


@register("token_recycling", TokenRecyclingConfig, "Token Recycling: draft trees from recycled top-k candidates",
          family="speed-up: model-free",
          paper="Luo et al. 2024, Token Recycling, arXiv:2408.08696")
def run(model: Any, prompt_ids: Sequence[int], config: TokenRecyclingConfig, rng: torch.Generator
        ) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, RecyclingDrafter(config), config, rng)
