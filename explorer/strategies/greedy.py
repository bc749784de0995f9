"""Greedy decoding: the argmax token at every step (the baseline every other method is measured against)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import Checked
from explorer.strategies.base import Choice, autoregressive, register


@dataclass(frozen=True)
class GreedyConfig(Checked):
    """Greedy decoding has no parameters."""


@register("greedy", GreedyConfig, "argmax token at every step",
          family='sampling', paper="the argmax rule (transformers' greedy generate is the reference)",
          reference_code="huggingface/transformers: src/transformers/generation/utils.py: GenerationMixin._sample "
                         "(do_sample=False: argmax of the processed scores)",
          departures=())
def run(model: Any, prompt_ids: Sequence[int], config: GreedyConfig, rng: torch.Generator) -> Iterator[Event]:
    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        return Choice(int(torch.argmax(logits)))

    yield from autoregressive(model, prompt_ids, choose)
