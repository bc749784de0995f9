"""Cautious next-token prediction (CNTP: "Cautious Next Token Prediction", Wang et al. 2025,
arXiv:2507.03038, Algorithm 1).

Notation: H_t = entropy (nats) of step t's processed distribution (after temperature), H_min / H_max = the
entropies that map to one trial / N_max trials, N = number of trials:
  N = max(1, min(N_max, floor((H_t - H_min) / (H_max - H_min) * N_max))).
With N = 1 the step samples one token as usual. With N > 1, N trials are sampled from here, each until its
first punctuation (or EOS), and the trial with the lowest perplexity exp(-mean log p) under the model is
committed. Defaults are the authors' (H_min 0.01, H_max 1.5, N_max 10). With H_min above any entropy the model
reaches it is plain sampling.
Departure: a trial that meets no punctuation stops at `max_trial_tokens` (a safety cap, generous by default;
the paper has none), and N_max x max_trial_tokens is bounded so one step's cost is bounded.
Departures from the authors' code (README's _sample_reflect_perplexity), found in the fidelity review, not fixed:
- a trial also ends at ')', ']' or '}' there, and only on the single-token ids of the punctuation marks, while
  `ends_trial` matches any of . , ; : ! ? or a newline anywhere in the token's text;
- a trial's perplexity there uses the processed (temperature-scaled) probabilities, here the raw model's (the
  same at temperature 1);
- there N = int(1 + (N_max - 1) * clamp((H - H_min) / (H_max - H_min), 0, 1)), which differs from
  `trial_count` near the bounds (e.g. 2 trials against 1 at 15% of the range).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, TrialBranch
from explorer.params import Checked, param
from explorer.sampling import StepStats, entropy, sample, step_stats
from explorer.strategies.base import RECORD_TOP_K, commit_token, register

PUNCTUATION = set(".,;:!?\n")  # departure: the authors' list also has ')', ']', '}' (as single-token ids)
MAX_TRIAL_PASSES = 2048  # forward passes one uncertain step may spend on its trials


@dataclass(frozen=True)
class CautiousConfig(Checked):
    h_min: float = param(0.01, "entropy (nats) at and below which a step samples one token", minimum=0.0,
                         maximum=10.0, step=0.01)
    h_max: float = param(1.5, "entropy (nats) at and above which a step gets n_max trials", minimum=0.01,
                         maximum=20.0, step=0.01)
    n_max: int = param(10, "most trials one step gets", minimum=1, maximum=32, step=1)
    max_trial_tokens: int = param(128, "safety cap on a trial that meets no punctuation", minimum=1,
                                  maximum=512, step=1)
    temperature: float = param(1.0, "sampling temperature (> 0)", minimum=0.05, maximum=3.0, step=0.05)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.h_max <= self.h_min:
            raise ValueError("need h_min < h_max")
        if self.n_max * self.max_trial_tokens > MAX_TRIAL_PASSES:
            raise ValueError(f"n_max x max_trial_tokens = {self.n_max * self.max_trial_tokens} forward passes per "
                             f"uncertain step; the limit is {MAX_TRIAL_PASSES}: lower either")


def trial_count(step_entropy: float, config: CautiousConfig) -> int:
    """Algorithm 1's N = max(1, min(N_max, floor((H - H_min) / (H_max - H_min) * N_max)))."""
    scaled = (step_entropy - config.h_min) / (config.h_max - config.h_min) * config.n_max
    return max(1, min(config.n_max, math.floor(scaled)))


def ends_trial(text: str) -> bool:
    return any(c in PUNCTUATION for c in text)


@register("cautious", CautiousConfig, "cautious next-token prediction: branch at uncertain steps, keep the "
                                      "lowest-perplexity trial",
          family="search",
          paper="Wang et al. 2025, cautious next-token prediction, arXiv:2507.03038",
          reference_code=("wyzjack/CNTP: README.md (key code snippet): GenerationMixin._sample_reflect_perplexity "
                          "(also in custom_transformers_packages/*/transformers/generation/utils.py)"),
          departures=(
              "a trial that meets no punctuation stops at max_trial_tokens (the authors' trials run to "
              "punctuation or the generation's stopping criteria), and n_max x max_trial_tokens is capped",
              "review finding, not fixed: "
              "a trial ends on any of . , ; : ! ? newline anywhere in a token's text; the authors' code "
              "ends it only on the single-token ids of . , newline ? ! : ; ) ] }, so ')', ']' and '}' never end a "
              "trial here and multi-character tokens containing punctuation do",
              "review finding, not fixed: "
              "the trial perplexity uses the raw model's log-probabilities; the authors' code uses the "
              "processed (temperature-scaled) probabilities the tokens were drawn from (same at temperature 1)",
              "trial count N = max(1, min(N_max, floor(x * N_max))), x = (H - H_min) / (H_max - H_min); the "
              "authors' code uses int(1 + (N_max - 1) * clamp(x, 0, 1)), e.g. 2 trials against 1 at x = 0.15 "
              "(our formula is taken as the paper's Algorithm 1; the paper's text was not rechecked here)",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: CautiousConfig, rng: torch.Generator) -> Iterator[Event]:
    session = model.session()
    logits = session.forward(list(prompt_ids), all_logits=False).logits[-1]
    eos = model.eos_token_ids
    context = list(prompt_ids)

    def processed(raw: torch.Tensor) -> torch.Tensor:
        return raw / config.temperature if config.temperature != 1.0 else raw

    def draw(raw: torch.Tensor) -> tuple[int, torch.Tensor]:
        kept = processed(raw)
        return sample(kept, rng), kept

    step = 0
    while True:
        step_entropy = float(entropy(processed(logits)))
        trials_here = trial_count(step_entropy, config)
        if trials_here == 1:
            token, kept = draw(logits)
            yield commit_token(model, step, len(context), token, logits, kept, details={"entropy_trigger": 0.0})
            context.append(token)
            step += 1
            logits = session.forward([token]).logits[-1]
            continue
        base = session.length
        trials: list[tuple[list[int], list[StepStats], float]] = []
        for _ in range(trials_here):
            tokens, stats, raw = [], [], logits
            for _ in range(config.max_trial_tokens):
                token, kept = draw(raw)
                tokens.append(token)
                stats.append(step_stats(raw, kept, token, RECORD_TOP_K))
                raw = session.forward([token]).logits[-1]
                if token in eos or ends_trial(model.piece(token)):
                    break
            # departure: raw-model log-probs; the authors' code scores the processed (temperature-scaled) ones
            perplexity = math.exp(-sum(s.logprob for s in stats) / len(stats))
            trials.append((tokens, stats, perplexity))
            session.crop(base)
        chosen = min(range(len(trials)), key=lambda i: trials[i][2])
        tokens, stats, _ = trials[chosen]
        yield TrialBranch(step=step, position=len(context), entropy=step_entropy, trials=[t[0] for t in trials],
                          trial_texts=[model.decode(t[0]) for t in trials], perplexities=[t[2] for t in trials],
                          chosen=chosen)
        logits = session.forward(tokens).logits[-1]  # rebuild the cache along the chosen trial
        for token, token_stats in zip(tokens, stats, strict=True):
            yield commit_token(model, step, len(context), token, stats=token_stats, details={"entropy_trigger": 1.0})
            context.append(token)
            step += 1
