"""First-finish search (Agarwal et al. 2025, "First Finish Search: Efficient Test-Time Scaling in Large Language
Models", arXiv:2505.18149).

n independent samples are decoded in parallel (one batch on a shared prompt cache) and the search returns as
soon as the first of them finishes (emits an end token): the shortest complete trace, which the paper finds is
more often correct for reasoning, at the latency of one short sample. The run commits the winner; a FinishRace
event records every sample as it stood when the race stopped (its tokens, length, log-probability, whether it
finished).
Departure: when no sample finishes within the token budget, the paper has nothing to return; we commit the
sample with the highest mean log-probability per token (and say so in the record).
Departures: samples are plain temperature draws (no top-p / top-k); when several samples end at the same step,
the lowest row wins (the paper does not say how a tie breaks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, FinishRace
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register
from explorer.strategies.batch_sampling import sample_rows

MAX_RACE_TOKENS = 16 * 1024  # samples x new tokens decoded together


@dataclass(frozen=True)
class FirstFinishConfig(Checked):
    samples: int = param(8, "n: samples raced in parallel", minimum=2, maximum=32, step=1)
    temperature: float = param(1.0, "sampling temperature", minimum=0.05, maximum=3.0, step=0.05)

    def check_cost(self, max_new_tokens: int) -> None:
        if self.samples * max_new_tokens > MAX_RACE_TOKENS:
            raise ValueError(f"{self.samples} samples x {max_new_tokens} new tokens is over the limit of "
                             f"{MAX_RACE_TOKENS} tokens decoded together: use fewer samples or fewer new tokens")


@register("first_finish", FirstFinishConfig, "race n samples, keep the first that finishes", needs_budget=True,
          family="search", paper="Agarwal et al. 2025, First Finish Search, arXiv:2505.18149",
          reference_code="none public",
          departures=(
              "when no sample finishes within the token budget the paper has nothing to return; we commit the "
              "sample with the highest mean log-probability per token",
              "each sample is plain ancestral sampling at one temperature (no top-p / top-k), whatever sampling "
              "settings the paper's models ran with",
              "samples that end at the same step tie; the lowest row index wins",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: FirstFinishConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    race = sample_rows(model, prompt_ids, config.samples, config.temperature, rng, max_new_tokens,
                       stop_at_first=True)
    lengths = [len(t) for t in race.tokens]
    if race.order:
        winner, reason = race.order[0], "the first to finish"
    else:  # departure: nobody finished within the budget
        winner = max(range(config.samples), key=lambda r: race.logprobs[r] / max(1, lengths[r]))
        reason = "none finished: the highest mean log-probability"
    yield FinishRace(samples=race.tokens, texts=[model.decode(t) for t in race.tokens], lengths=lengths,
                     logprobs=[round(v, 6) for v in race.logprobs],
                     finished=[f is not None for f in race.finished_at], finish_order=race.order, chosen=winner,
                     reason=reason)
    position = len(prompt_ids)
    for step, (token, stats) in enumerate(zip(race.tokens[winner], race.stats[winner], strict=True)):
        yield commit_token(model, step, position + step, token, stats=stats)
