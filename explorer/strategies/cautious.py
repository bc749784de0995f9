"""Cautious next-token prediction (CNTP: "Cautious Next Token Prediction", Wang et al. 2025,
arXiv:2507.03038).

Notation: H_t = entropy of the step's distribution (nats), tau = the entropy above which a step is uncertain,
N = number of trials. At a confident step (H_t < tau) one token is sampled as usual. At an uncertain step,
N trials are sampled from here, each until its first punctuation (or EOS, or a length cap), and the trial with
the lowest perplexity exp(-mean log p) under the model is committed. N grows as confidence falls:
N = n_min + round((n_max - n_min) * min(1, (H_t - tau) / tau)).
Departure: the paper ties the trigger to the model's running entropy statistics; we take a fixed threshold tau.
With tau = infinity it is plain sampling.
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

PUNCTUATION = set(".,;:!?\n")
MAX_TRIAL_PASSES = 512  # forward passes one uncertain step may spend on its trials


@dataclass(frozen=True)
class CautiousConfig(Checked):
    threshold: float = param(2.0, "entropy (nats) above which a step branches", minimum=0.0, maximum=10.0,
                             step=0.1)
    min_trials: int = param(2, "trials at the threshold", minimum=1, maximum=16, step=1)
    max_trials: int = param(6, "trials at twice the threshold and above", minimum=1, maximum=32, step=1)
    max_trial_tokens: int = param(16, "longest trial", minimum=1, maximum=64, step=1)
    temperature: float = param(1.0, "sampling temperature (> 0)", minimum=0.05, maximum=3.0, step=0.05)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_trials > self.max_trials:
            raise ValueError("need min_trials <= max_trials")
        if self.max_trials * self.max_trial_tokens > MAX_TRIAL_PASSES:
            raise ValueError(f"max_trials x max_trial_tokens = {self.max_trials * self.max_trial_tokens} forward "
                             f"passes per uncertain step; the limit is {MAX_TRIAL_PASSES}: lower either")


def trial_count(step_entropy: float, config: CautiousConfig) -> int:
    """How many trials an uncertain step gets: more as the entropy rises past the threshold."""
    excess = (step_entropy - config.threshold) / config.threshold if config.threshold > 0 else 1.0
    return config.min_trials + round((config.max_trials - config.min_trials) * min(1.0, max(0.0, excess)))


def ends_trial(text: str) -> bool:
    return any(c in PUNCTUATION for c in text)


@register("cautious", CautiousConfig, "cautious next-token prediction: branch at uncertain steps, keep the "
                                      "lowest-perplexity trial",
          family="search",
          paper="Wang et al. 2025, cautious next-token prediction, arXiv:2507.03038")
def run(model: Any, prompt_ids: Sequence[int], config: CautiousConfig, rng: torch.Generator) -> Iterator[Event]:
    session = model.session()
    logits = session.forward(list(prompt_ids), all_logits=False)[-1]
    eos = model.eos_token_ids
    context = list(prompt_ids)

    def draw(raw: torch.Tensor) -> tuple[int, torch.Tensor]:
        kept = raw / config.temperature if config.temperature != 1.0 else raw
        return sample(kept, rng), kept

    step = 0
    while True:
        step_entropy = float(entropy(logits))
        if step_entropy < config.threshold:
            token, kept = draw(logits)
            yield commit_token(model, step, len(context), token, logits, kept, details={"entropy_trigger": 0.0})
            context.append(token)
            step += 1
            logits = session.forward([token])[-1]
            continue
        base = session.length
        trials: list[tuple[list[int], list[StepStats], float]] = []
        for _ in range(trial_count(step_entropy, config)):
            tokens, stats, raw = [], [], logits
            for _ in range(config.max_trial_tokens):
                token, kept = draw(raw)
                tokens.append(token)
                stats.append(step_stats(raw, kept, token, RECORD_TOP_K))
                raw = session.forward([token])[-1]
                if token in eos or ends_trial(model.piece(token)):
                    break
            perplexity = math.exp(-sum(s.logprob for s in stats) / len(stats))
            trials.append((tokens, stats, perplexity))
            session.crop(base)
        chosen = min(range(len(trials)), key=lambda i: trials[i][2])
        tokens, stats, _ = trials[chosen]
        yield TrialBranch(step=step, position=len(context), entropy=step_entropy, trials=[t[0] for t in trials],
                          trial_texts=[model.decode(t[0]) for t in trials], perplexities=[t[2] for t in trials],
                          chosen=chosen)
        logits = session.forward(tokens)[-1]  # rebuild the cache along the chosen trial
        for token, token_stats in zip(tokens, stats, strict=True):
            yield commit_token(model, step, len(context), token, stats=token_stats, details={"entropy_trigger": 1.0})
            context.append(token)
            step += 1
