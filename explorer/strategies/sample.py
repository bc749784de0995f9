"""Ancestral sampling with composable filters, in transformers' order.

Filters: repetition penalty (Keskar et al. 2019, "CTRL", arXiv:1909.05858), temperature, top-k (Fan et al.
2018), top-p / nucleus (Holtzman et al. 2020, arXiv:1904.09751), min-p (Nguyen et al. 2024,
arXiv:2407.01082), locally typical (Meister et al. 2023, arXiv:2202.00666), epsilon and eta (Hewitt et al.
2022, arXiv:2210.15191). Each step: logits -> filters -> softmax -> draw one token with the seeded generator.
Departure (repetition penalty, in explorer.sampling): transformers' rule, which multiplies a negative logit by
the penalty and divides a positive one, over prompt and generated tokens alike; CTRL's paper and code divide
every seen token's logit, whatever its sign (the code skips the newline token).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.sampling import SamplingFilters, sample
from explorer.strategies.base import Choice, autoregressive, register


@dataclass(frozen=True)
class SampleConfig(SamplingFilters):
    """Every filter of SamplingFilters, with its declared help and range."""


@register("sample", SampleConfig, "sampling with temperature, top-k/p, min-p, typical, epsilon, eta",
          family="sampling",
          paper=("Holtzman et al. 2020 (top-p), arXiv:1904.09751; Hewitt et al. 2022 (epsilon, eta); Meister et "
                 "al. 2023 (typical); Nguyen et al. 2024 (min-p); Keskar et al. 2019 (repetition penalty)"),
          reference_code=("huggingface/transformers: src/transformers/generation/logits_process.py: "
                          "RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, "
                          "TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper, EpsilonLogitsWarper, "
                          "EtaLogitsWarper (order: GenerationMixin._get_logits_processor); CTRL's own penalty: "
                          "salesforce/ctrl: generation.py: the generation loop"),
          departures=(
              "repetition penalty multiplies negative logits by the penalty (transformers' rule); CTRL's paper "
              "and generation.py divide every seen token's logit by it whatever its sign, and the code exempts "
              "the newline token",
              "repetition penalty covers the prompt as well as generated tokens (as transformers and CTRL's "
              "code do); the CTRL paper's formula names only the generated tokens g",
              "top-k keeps every token tied with the k-th logit (as transformers), so more than k may survive",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: SampleConfig, rng: torch.Generator) -> Iterator[Event]:
    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        kept = config.apply(logits, context)  # (vocab,), -inf outside the kept set
        return Choice(sample(kept, rng), kept)

    yield from autoregressive(model, prompt_ids, choose)
