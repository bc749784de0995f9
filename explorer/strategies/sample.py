"""Ancestral sampling with composable filters, in transformers' order.

Filters: repetition penalty (Keskar et al. 2019, "CTRL", arXiv:1909.05858), temperature, top-k (Fan et al.
2018), top-p / nucleus (Holtzman et al. 2020, arXiv:1904.09751), min-p (Nguyen et al. 2024,
arXiv:2407.01082), locally typical (Meister et al. 2023, arXiv:2202.00666), epsilon and eta (Hewitt et al.
2022, arXiv:2210.15191). Each step: logits -> filters -> softmax -> draw one token with the seeded generator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import param
from explorer.sampling import SamplingFilters, sample
from explorer.strategies.base import Choice, autoregressive, register


@dataclass(frozen=True)
class SampleConfig(SamplingFilters):
    temperature: float = param(1.0, "divide logits by this (> 0)", minimum=0.05, maximum=3.0, step=0.05)
    top_k: int = param(0, "keep the k most likely tokens (0 = off)", minimum=0, maximum=200, step=1)
    top_p: float = param(1.0, "nucleus: keep mass p (1 = off)", minimum=0.01, maximum=1.0, step=0.01)
    min_p: float = param(0.0, "keep tokens >= min_p x top prob (0 = off)", minimum=0.0, maximum=0.99, step=0.01)
    typical_p: float = param(1.0, "locally typical mass (1 = off)", minimum=0.01, maximum=1.0, step=0.01)
    epsilon_cutoff: float = param(0.0, "drop tokens with p < epsilon (0 = off)", minimum=0.0, maximum=0.5,
                                  step=0.0001)
    eta_cutoff: float = param(0.0, "eta sampling epsilon (0 = off)", minimum=0.0, maximum=0.5, step=0.0001)
    repetition_penalty: float = param(1.0, "penalise seen tokens (1 = off)", minimum=0.5, maximum=2.0,
                                      step=0.01)


@register("sample", SampleConfig, "sampling with temperature, top-k/p, min-p, typical, epsilon, eta")
def run(model: Any, prompt_ids: Sequence[int], config: SampleConfig, rng: torch.Generator) -> Iterator[Event]:
    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        kept = config.apply(logits, context)  # (vocab,), -inf outside the kept set
        return Choice(sample(kept, rng), kept)

    yield from autoregressive(model, prompt_ids, choose)
