"""A drafter as a plugin: when the text has started to repeat with some period p, draft the next tokens as the
ones p tokens back, and let the target verify them (propose -> verify -> accept -> commit, `draft_verify`).

No paper: a periodic special case of prompt lookup (Saxena 2023), for lists, tables and loops. Notation: c = the
context (prompt + committed tokens), p = the period, r = `min_repeat`, γ = `draft_length`.
1. Find the smallest p <= `max_period` with c[-j] == c[-j - p] for j = 1..r (the last r tokens repeat p back).
2. Draft d_i = c[len(c) - p + (i mod p)] for i = 0..γ-1: the period continued (a chain, q = a point mass).
   No period: an empty draft, which the engine turns into a plain step.
3. The target verifies the chain in one pass; under the greedy rule the output is token-identical to greedy
   decoding, under the sampling rule it is distributed exactly as the target's p.

Run it: `python -m explorer --plugin examples/plugins/period_drafter.py run --strategy period_draft
--prompt "1, 2, 3, 1, 2, 3, 1, 2"` (README, "Your own method").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.api import Drafter, DraftTree, Event, SpeculativeConfig, draft_verify, param, register


@dataclass(frozen=True)
class PeriodDraftConfig(SpeculativeConfig):
    max_period: int = param(8, "longest period looked for, in tokens", minimum=1, maximum=32, step=1)
    min_repeat: int = param(3, "tokens that must already repeat before a period is trusted", minimum=1, maximum=16,
                            step=1)
    draft_length: int = param(6, "tokens drafted per round (γ)", minimum=1, maximum=16, step=1)


def find_period(context: Sequence[int], max_period: int, min_repeat: int) -> int:
    """Step 1: the smallest period p whose last `min_repeat` tokens repeat p tokens back; 0 for none."""
    for p in range(1, max_period + 1):
        if len(context) >= p + min_repeat and all(context[-j] == context[-j - p] for j in range(1, min_repeat + 1)):
            return p
    return 0


class PeriodDrafter(Drafter):
    name = "period"

    def __init__(self, config: PeriodDraftConfig):
        self.config = config

    def propose(self, context: Sequence[int]) -> DraftTree:
        period = find_period(context, self.config.max_period, self.config.min_repeat)
        if not period:
            return DraftTree()
        tail = list(context[-period:])
        tokens = [tail[i % period] for i in range(self.config.draft_length)]  # 2.
        return DraftTree.chain(tokens, period=float(period))


@register("period_draft", PeriodDraftConfig, "draft the next tokens by continuing the text's period",
          family="speed-up: model-free", paper="no paper: an example plugin (periodic prompt lookup)")
def run(model: Any, prompt_ids: Sequence[int], config: PeriodDraftConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, PeriodDrafter(config), config, rng)  # 3.
