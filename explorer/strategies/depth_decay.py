"""D^3 as a drafter: position-aware depth decay (Fan et al. 2025, "Position-Aware Depth Decay Decoding (D^3):
Boosting Large Language Model Inference Efficiency", arXiv:2503.08524), its layer-skipping schedule used to
draft for exact verification.

Notation: L = layers, alpha = decay rate, i = index of the draft token in the round (1-based), n_i = layers run
for it, gamma = draft length.
1. Depth decay: n_i = floor(L alpha^i) (at least `min_layers`): later tokens get shallower passes, following the
   paper's observation that later tokens have lower perplexity.
2. Which layers: the paper splits the layers into core ones near the input and the output, which always run, and
   flexible ones in the middle, which are skipped. The pass for token i runs the first ceil(n_i / 2) and the last
   floor(n_i / 2) layers and skips the L - n_i between them (then the final norm and LM head). Departure: the
   paper's text we could read says the core layers are the head and the tail and that skipping takes the middle;
   the even split between head and tail is ours (no code of the authors was found).
3. Draft on the target's own cache (draft_models.EarlyExitDrafter with these layers): n_i never increases along
   a draft, so each token's layers are among the previous token's and every pass finds the K/V it attends to.
   The skipped middle layers have no K/V for the draft positions; the target's verification pass runs every layer
   from the last committed token on and writes them, as layer-skip self-speculation does. Verify (greedy rule:
   token-identical to greedy; sampling rule: exactly p); gamma adapts to acceptance.
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
    min_layers: int = param(2, "never draft with fewer layers than this (2: the first and the last always run)",
                            minimum=1, maximum=64, step=1)


def decayed_depths(layers: int, alpha: float, count: int, min_layers: int = 1) -> list[int]:
    """Step 1: floor(L alpha^i) for i = 1..count, clamped to [min_layers, L]."""
    return [min(layers, max(min_layers, math.floor(layers * alpha ** i + 1e-9))) for i in range(1, count + 1)]


def retained_layers(layers: int, count: int) -> list[int]:
    """Step 2: the first ceil(n / 2) and the last floor(n / 2) of `layers` layers, n = `count` (in [1, L])."""
    count = max(1, min(count, layers))
    head = (count + 1) // 2
    return [*range(head), *range(layers - (count - head), layers)]


def layer_spans(kept: Sequence[int]) -> str:
    """[0, 1, 2, 6, 7] -> '0-2,6-7'."""
    spans: list[list[int]] = []
    for layer in kept:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class DepthDecayDrafter(EarlyExitDrafter):
    name = "D^3 depth decay"

    def __init__(self, model: Any, config: DepthDecayConfig, rng: torch.Generator):
        super().__init__(model, config, rng)
        self.length = DraftLength(config.draft_length, config.adaptive)
        self.alpha, self.min_layers = config.alpha, config.min_layers
        self._drafted = 0

    def depths(self) -> list[int]:
        return decayed_depths(self.total, self.alpha, self.length.current, self.min_layers)

    def kept_layers(self, count: int) -> list[int]:
        return retained_layers(self.total, count)

    def propose(self, context: Sequence[int]) -> DraftTree:
        draft = super().propose(context)
        self._drafted = len(draft.tokens)
        return draft

    def round_details(self) -> dict[str, float | str]:
        return {"draft_depths": ",".join(str(d) for d in self.drafted_depths),
                "draft_layers": ";".join(layer_spans(self.kept_layers(d)) for d in self.drafted_depths)}

    def observe(self, verdict: Verdict) -> None:
        self.length.update(verdict, self._drafted)


@register("depth_decay", DepthDecayConfig, "D^3 depth decay as a drafter: the i-th draft token runs floor(L a^i) "
          "layers, the first and last ones, skipping the middle", prepare=early_exit_prepare,
          family="speed-up: draft-verify", paper="Fan et al. 2025, D^3, arXiv:2503.08524",
          reference_code="none public (no code of the authors found)",
          departures=(
              "i counts draft tokens within a round, not generated tokens, and every draft is verified: lossless, "
              "where the paper runs the schedule on the generated text unverified (lossy)",
              "the kept layers split evenly between head and tail (ceil(n/2) first, floor(n/2) last): the paper's "
              "core (head and tail) and flexible (middle) layers, its exact split not taken from the paper",
              "min_layers (default 2) bounds the decay so the first and last layers always run",
              "the skipped layers' K/V for draft positions are left empty and written by the verification pass "
              "(the paper, with no verification, has to fill them during generation)",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: DepthDecayConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, DepthDecayDrafter(model, config, rng), config, rng)
