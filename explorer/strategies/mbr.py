"""Minimum Bayes risk decoding by sampling (Eikema & Aziz 2020, "Is MAP Decoding All You Need? The Inadequacy of
the Mode in Neural Machine Translation", arXiv:2005.10283; sampling-based MBR as in Freitag et al. 2022).

Notation: H = {y_1 .. y_N} ancestral samples from the model (temperature T); u(h, r) a utility, here chrF (Popović
2015) computed in code; the MBR choice is y* = argmax_{h ∈ H} (1/(N−1)) Σ_{r ∈ H, r ≠ h} u(h, r), the samples
standing in for references (the Monte-Carlo estimate of the expected utility under the model). The N samples run
as one batch on a shared prompt cache; a greedy row runs beside them for comparison (not a candidate). The run
commits y*; an MbrResult records every candidate, its log-probability, the utility matrix, the expected
utilities, the choice, the best-of-N by log-probability, and the greedy output. chrF is sacrebleu's sentence chrF
(explorer.utility.chrf: every whitespace character removed before the character n-grams). Departure: the
self-comparison is left out of the expected utility (see `departures` below).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, MbrResult
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register
from explorer.strategies.batch_sampling import sample_rows
from explorer.utility import expected_utilities, utility_matrix

MAX_MBR_TOKENS = 16 * 1024  # (samples + the greedy row) x new tokens held in the batched cache


@dataclass(frozen=True)
class MbrConfig(Checked):
    samples: int = param(8, "N: candidates sampled (the pseudo-references too)", minimum=2, maximum=32, step=1)
    temperature: float = param(1.0, "sampling temperature of the candidates", minimum=0.05, maximum=3.0, step=0.05)

    def check_cost(self, max_new_tokens: int) -> None:
        check_mbr_cost(self.samples, max_new_tokens)


def check_mbr_cost(samples: int, max_new_tokens: int) -> None:
    if (samples + 1) * max_new_tokens > MAX_MBR_TOKENS:
        raise ValueError(f"{samples} samples x {max_new_tokens} new tokens is over the limit of {MAX_MBR_TOKENS} "
                         "tokens decoded together: use fewer samples or fewer new tokens")


def mbr_choice(texts: list[str]) -> tuple[int, list[list[float]], list[float]]:
    """(index of y*, utility matrix, expected utilities)."""
    matrix = utility_matrix(texts)
    expected = expected_utilities(matrix)
    return max(range(len(texts)), key=lambda i: (expected[i], -i)), matrix, expected


@register("mbr", MbrConfig, "sample N candidates, commit the one that agrees most with the others (chrF)",
          needs_budget=True, family="search",
          paper="Eikema & Aziz 2020, MBR by sampling, arXiv:2005.10283; chrF: Popović 2015",
          reference_code="Roxot/mbr-nmt: mbr_nmt/mbr.py: mbr; chrF as mjpost/sacrebleu: sacrebleu/metrics/chrf.py: "
                         "CHRF (default whitespace=False)",
          departures=(
              "the expected utility leaves the candidate out, 1/(N−1) Σ_{r≠h} u(h, r); the authors' mbr averages "
              "over all N samples, itself included (u(h, h) = 100 lifts every non-empty candidate alike, so the "
              "choice differs only for an empty one)",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: MbrConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    check_mbr_cost(config.samples, max_new_tokens)
    samples = sample_rows(model, prompt_ids, config.samples + 1, config.temperature, rng, max_new_tokens,
                          greedy_row=True)  # row 0: greedy, for comparison
    tokens, stats, logprobs = samples.tokens, samples.stats, samples.logprobs
    texts = [model.decode(t) for t in tokens]
    best, matrix, expected = mbr_choice(texts[1:])
    by_logprob = max(range(config.samples), key=lambda i: logprobs[i + 1])
    yield MbrResult(candidates=tokens[1:], texts=texts[1:], logprobs=[round(v, 6) for v in logprobs[1:]],
                    utilities=[[round(u, 4) for u in row] for row in matrix],
                    expected=[round(u, 4) for u in expected], chosen=best, best_by_logprob=by_logprob,
                    greedy_ids=tokens[0], greedy_text=texts[0], greedy_logprob=round(logprobs[0], 6))
    position = len(prompt_ids)
    for step, (token, step_stat) in enumerate(zip(tokens[best + 1], stats[best + 1], strict=True)):
        yield commit_token(model, step, position + step, token, stats=step_stat)
