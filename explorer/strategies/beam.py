"""Beam search, recorded as a growing tree, token-identical to transformers' `generate(num_beams=B)`.

Notation: B = beams, K = candidates kept per step = max(2, 1 + number of EOS ids) * B, lp = length penalty.
Each step (one batched forward pass for all B beams):
  1. score every continuation: s(beam, v) = score(beam) + log p(v | beam); take the K best over all beams;
  2. a candidate that ends (EOS, or the length limit) and ranks in the top B of those K becomes a finished
     hypothesis with score s / (generated length ** lp); the best B finished hypotheses are kept;
  3. the B best candidates that do not end become the next beams (the KV cache rows are reordered to them);
  4. stop when no beam can still beat the worst finished hypothesis (transformers' heuristic: with
     early_stopping=False the best running score is normalised by the current length; "never" uses the
     maximum length when lp > 0; True stops as soon as B hypotheses are finished), or at the length limit.
This follows transformers' vectorised beam search (GenerationMixin._beam_search), step for step, so that
sequences and scores agree. The loop lives in beam_search.py, shared with diverse beam search.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import Checked, param
from explorer.strategies.base import register
from explorer.strategies.beam_search import EARLY_STOPPING, BeamGroup, beam_loop, check_beam_cost


@dataclass(frozen=True)
class BeamConfig(Checked):
    num_beams: int = param(4, "beams B", minimum=1, maximum=16, step=1)
    length_penalty: float = param(1.0, "score / length ** lp (> 0 favours longer)", minimum=-2.0, maximum=3.0,
                                  step=0.1)
    early_stopping: str = param("false", "stop rule: false (heuristic), true (B finished), never",
                                choices=EARLY_STOPPING)
    num_return: int = param(0, "size of the n-best list (0 = one per beam)", minimum=0, maximum=16, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_return > self.num_beams:
            raise ValueError("num_return must be between 0 (one per beam) and num_beams")

    def check_cost(self, max_new_tokens: int) -> None:
        check_beam_cost(self.num_beams, max_new_tokens)


@register("beam", BeamConfig, "beam search (recorded tree; matches transformers' num_beams)", needs_budget=True,
          family='search', paper="beam search as transformers' generate(num_beams) runs it",
          reference_code="huggingface/transformers: src/transformers/generation/utils.py: GenerationMixin._beam_search",
          departures=())
def run(model: Any, prompt_ids: Sequence[int], config: BeamConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    group = BeamGroup(config.num_beams, model.eos_token_ids, len(prompt_ids), len(prompt_ids) + max_new_tokens,
                      config.length_penalty, config.early_stopping)
    yield from beam_loop(model, prompt_ids, [group], max_new_tokens, config.num_return or config.num_beams)
