"""EAGLE: speculative decoding with a trained feature-level draft head (Li, Wei, Zhang, Zhang 2024, "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty", arXiv:2401.15077); the head is explorer.heads.

Notation: c = committed tokens, f_j = the target's feature after c_j (its normed last hidden state), f^ = the
head's predicted feature, V_d = the head's draft vocabulary, gamma = draft length.
1. Feed the head the pairs (e(c_(j+1)), f_j) it has not seen (the real features come from the target's own
   passes: the prompt pass, then each verification); its output at the last pair, whose token is the last
   committed one, predicts the first draft token.
2. Draft autoregressively in feature space: the pair (e(d_i), f^) gives the next f^, gamma tokens in all
   (argmax under the greedy rule; a draw from the filtered q over V_d under the sampling rule). Departure:
   EAGLE-1 drafts a static tree; a chain here is gamma long, and adaptive by default (DraftLength).
3. The target verifies the chain in one pass (exact under both rules: q is 0 outside V_d), and its hidden states
   give the real features of the accepted positions for the next round; the head's speculative pairs are
   dropped from its cache.
The head is loaded from `drafter`: a directory written by `python -m explorer train-drafter`, or a released
EAGLE-1 or EAGLE-3 head (a directory or Hub id: explorer.heads.load_published; an EAGLE-3 head reads the fused
low/mid/high hidden states instead of f_j and scores with its own LM head); empty: the head shipped for the model.
`tree=dynamic` drafts EAGLE-2's dynamic tree instead of a chain (Li et al. 2024, arXiv:2406.16858), as the
authors' SafeAILab/EAGLE: eagle/model/cnets.py: Model.topK_genrate does: expand the top-k nodes per level, then
rerank the whole pool of candidates by path score (strategies/eagle_drafter.py: EagleDrafter._dynamic). See
explorer/heads.py for the heads' departures.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.heads import resolve_head
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_models import ChainDraftConfig
from explorer.strategies.draft_verify import draft_verify
from explorer.strategies.eagle_drafter import DynamicTree, EagleDrafter


@dataclass(frozen=True)
class EagleConfig(ChainDraftConfig):
    tree: str = param("chain", "chain: gamma tokens; dynamic: EAGLE-2's tree (expand the tree_top_k most confident "
                               "nodes per level, keep the budget best of all candidates)", choices=("chain", "dynamic"))
    tree_top_k: int = param(4, "dynamic tree: nodes expanded per level and children per node (EAGLE-2's top-k; "
                                "the sampling rule's top_k filters the distributions)", minimum=1, maximum=10, step=1)
    depth: int = param(5, "dynamic tree: levels (the authors' depth + 1)", minimum=1, maximum=10, step=1)
    budget: int = param(16, "dynamic tree: nodes kept for verification, the best of the tree_top_k + (depth - 1) * "
                             "tree_top_k^2 candidates (EAGLE-2's total_tokens)", minimum=1, maximum=64, step=1)

    def draft_nodes(self) -> int:
        return self.budget if self.tree == "dynamic" else self.draft_length

    def dynamic_tree(self) -> DynamicTree | None:
        """EAGLE-2's tree settings with tree = dynamic, else None (a chain)."""
        return DynamicTree(self.tree_top_k, self.depth, self.budget) if self.tree == "dynamic" else None
    drafter: str = param("", "directory of a trained draft head (head.json + head.safetensors); empty: the head "
                             "shipped for this model in assets/drafters", model=True)
    draft_length: int = param(5, "maximum draft length gamma", minimum=1, maximum=16, step=1)


def prepare(model: Any, config: EagleConfig) -> None:
    resolve_head(model, config.drafter, "eagle")


@register("eagle", EagleConfig, "EAGLE: a trained head drafts from the target's own features", prepare=prepare,
          family="speed-up: draft-verify", paper="Li et al. 2024, EAGLE, arXiv:2401.15077",
          reference_code="SafeAILab/EAGLE: eagle/model/cnets.py: Model.topK_genrate (EAGLE-2 tree), "
                         "eagle/train/main.py (EAGLE-1 training loss and noise)",
          departures=(
              "the head is trained here on this machine's data (local text or the target's own answers, minutes), "
              "not on ShareGPT for days; a released EAGLE-1/3 head can be loaded instead",
              "our trained head drafts over a reduced vocabulary V_d (FR-Spec, EAGLE-3's d2t), EAGLE-1's over the "
              "whole vocabulary; q is zero outside V_d",
              "our trained head keeps an input norm and a final norm that EAGLE-1's head lacks (explorer/heads.py)",
              "tree=chain (the default) drafts one chain of gamma tokens, adaptive by default; EAGLE-1 drafts a "
              "static tree",
              "dynamic tree: smaller defaults (top-k 4, 5 levels, budget 16) than the authors' (top-k 10, depth 7, "
              "60 tokens), and a fixed tie order where the authors' torch.topk leaves ties to the implementation",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: EagleConfig, rng: torch.Generator) -> Iterator[Event]:
    drafter = EagleDrafter(model, resolve_head(model, config.drafter, "eagle"), config, rng, config.dynamic_tree())
    yield from draft_verify(model, prompt_ids, drafter, config, rng)
