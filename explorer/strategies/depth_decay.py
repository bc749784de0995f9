"""D^3 as a drafter: position-aware depth decay (Fan et al. 2025, "Position-Aware Depth Decay Decoding (D^3):
Boosting Large Language Model Inference Efficiency", arXiv:2503.08524), its layer-dropping schedule used to
draft for exact verification.

Notation: L = layers, alpha = decay rate, i = index of the draft token in the round (1-based), gamma = draft
length. The i-th draft token is drafted by the first floor(L * alpha^i) layers of the target (at least
`min_layers`), then its final norm and LM head: later tokens of a draft get shallower passes, following the
paper's observation that later tokens are easier. The depths never increase along a draft, so each pass finds
the K/V it attends to in the layers it runs (draft_models.EarlyExitDrafter), on the target's own cache.
The draft is verified by the target (greedy rule: token-identical to greedy; sampling rule: exactly p); gamma
adapts to acceptance.
Departure (the issue's framing): the paper applies the schedule to the i-th *generated* token with no
verification (lossy, ~1.5x at <1% quality loss on trained Llama models); here it schedules draft depth inside a
round, and every token is verified, so the output is the target's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_models import ChainDraftConfig, EarlyExitDrafter, early_exit_prepare
from explorer.strategies.draft_verify import DraftLength, DraftTree, Verdict, draft_verify


@dataclass(frozen=True)
class DepthDecayConfig(ChainDraftConfig):
    alpha: float = param(0.85, "decay rate: the i-th draft token keeps floor(L alpha^i) layers", minimum=0.05,
                         maximum=0.999, step=0.005)
    min_layers: int = param(1, "never draft with fewer layers than this", minimum=1, maximum=64, step=1)


def decayed_depths(layers: int, alpha: float, count: int, min_layers: int = 1) -> list[int]:
    """floor(L alpha^i) for i = 1..count, clamped to [min_layers, L]."""
    return [min(layers, max(min_layers, math.floor(layers * alpha ** i + 1e-9))) for i in range(1, count + 1)]


class DepthDecayDrafter(EarlyExitDrafter):
    name = "D^3 depth decay"

    def __init__(self, model: Any, config: DepthDecayConfig, rng: torch.Generator):
        super().__init__(model, config, rng)
        self.length = DraftLength(config.draft_length, config.adaptive)
        self.alpha, self.min_layers = config.alpha, config.min_layers
        self._drafted = 0

    def depths(self) -> list[int]:
        return decayed_depths(self.total, self.alpha, self.length.current, self.min_layers)

    def propose(self, context: Sequence[int]) -> DraftTree:
        draft = super().propose(context)
        self._drafted = len(draft.tokens)
        return draft

    def round_details(self) -> dict[str, float | str]:
        return {"draft_depths": ",".join(str(d) for d in self.drafted_depths)}

    def observe(self, verdict: Verdict) -> None:
        self.length.update(verdict, self._drafted)


@register("depth_decay", DepthDecayConfig, "D^3 depth decay as a drafter: the i-th draft token runs floor(L a^i) "
          "layers", prepare=early_exit_prepare, family="speed-up: draft-verify",
          paper="Fan et al. 2025, D^3, arXiv:2503.08524")
def run(model: Any, prompt_ids: Sequence[int], config: DepthDecayConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, DepthDecayDrafter(model, config, rng), config, rng)
