"""Medusa: draft heads on the target's last hidden state, a tree of their top-k combinations (Cai, Li, Geng, Peng,
Lee, Chen, Dao 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
arXiv:2401.10774); the heads are explorer.heads.MedusaHeads (Medusa-1: frozen target).

Notation: h_t = the target's normed last hidden state after x_t (its LM head predicts x_(t+1) from it); head k
(k = 1..K) predicts x_(t+1+k) from the same h_t; s_k = the top-s_k tokens of head k (`widths`).
Each round, with h the feature of the last position the target processed (its LM head already gave the last
committed token):
1. Head k's top-s_k tokens are the candidates at depth k of the tree; every node at depth k - 1 gets all of
   them as children (the heads guess each position independently: the tree is the Cartesian product, pruned by
   the widths, as Medusa's sparse trees are).
2. The target verifies the tree in one tree-masked pass; the accepted path and the bonus token are committed
   (deterministic candidates: point masses, exact under both rules), and the hidden state of the last accepted
   position is the next h.
Departures: the widths are uniform per depth (Medusa ships hand-tuned sparse trees of 64 nodes); heads predict
over a reduced draft vocabulary V_d (their output rows start as the LM head's rows for V_d).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.heads import resolve_head
from explorer.params import param
from explorer.strategies.base import register, tree_prepare
from explorer.strategies.draft_verify import Drafter, DraftTree, SpeculativeConfig, Verdict, draft_verify
from explorer.trees import parse_widths, uniform_tree_size


@dataclass(frozen=True)
class MedusaConfig(SpeculativeConfig):
    widths: str = param("3,2,1", "top-k tokens of head 1, 2, ... (children per node at each depth)")
    drafter: str = param("", "directory of trained Medusa heads (head.json + head.safetensors); empty: the heads "
                             "shipped for this model in assets/drafters", model=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_widths(self.widths)

    def draft_nodes(self) -> int:
        return uniform_tree_size(parse_widths(self.widths))


def medusa_tree(candidates: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """Step 1: (tokens, parents, depth of each node) of the tree whose depth-k nodes are candidates[k] under
    every node of depth k - 1, breadth-first."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    frontier = [-1]
    for depth, level in enumerate(candidates):
        new = []
        for parent in frontier:
            for token in level:
                tokens.append(int(token))
                parents.append(parent)
                depths.append(depth)
                new.append(len(tokens) - 1)
        frontier = new
    return tokens, parents, depths


class MedusaDrafter(Drafter):
    name = "Medusa heads"
    wants_hidden_states = True
    wants_prefill_hidden_states = True

    def __init__(self, heads: Any, config: MedusaConfig):
        self.heads, self.widths = heads, parse_widths(config.widths)[: len(heads.blocks)]
        self.feature: torch.Tensor | None = None  # h at the last position the target processed

    def observe_prefill(self, inputs: Sequence[int], logits: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.feature = hidden_states[-1, -1]

    @torch.inference_mode()
    def propose(self, context: Sequence[int]) -> DraftTree:
        if self.feature is None:  # a one-token prompt: nothing processed yet; a one-token draft gets h verified
            return DraftTree.chain([int(self.heads.draft_ids[0])])
        scores = self.heads(self.feature.unsqueeze(0))[:, 0]  # (K, |V_d|)
        candidates = []
        confidence = []
        for k, width in enumerate(self.widths):
            top = torch.topk(torch.softmax(scores[k].float(), dim=-1), width)
            candidates.append([int(self.heads.draft_ids[i]) for i in top.indices.tolist()])
            confidence.append(top.values.tolist())
        tokens, parents, depths = medusa_tree(candidates)
        probs = [confidence[d][candidates[d].index(t)] for t, d in zip(tokens, depths, strict=True)]
        tree = DraftTree(tokens, parents, probs, None, mode="point")
        tree.details["nodes"] = float(len(tokens))
        return tree

    def observe(self, verdict: Verdict) -> None:
        if verdict.hidden_states is not None:
            last = verdict.path[-1] + 1 if verdict.path else 0
            self.feature = verdict.hidden_states[-1, last]


def prepare(model: Any, config: MedusaConfig) -> None:
    tree_prepare(model, config)
    resolve_head(model, config.drafter, "medusa")


@register("medusa", MedusaConfig, "Medusa: trained heads guess the next tokens from one hidden state, verified as "
          "a tree", prepare=prepare, family="speed-up: draft-verify",
          paper="Cai et al. 2024, Medusa, arXiv:2401.10774")
def run(model: Any, prompt_ids: Sequence[int], config: MedusaConfig, rng: torch.Generator) -> Iterator[Event]:
    drafter = MedusaDrafter(resolve_head(model, config.drafter, "medusa"), config)
    yield from draft_verify(model, prompt_ids, drafter, config, rng)
