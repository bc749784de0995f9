"""Entropy-adaptive decoding, EAD (Simonds 2025, "Entropy Adaptive Decoding: Dynamic Model Switching for
Efficient Inference", arXiv:2502.06833): a small model writes until its uncertainty rises, then the large model
takes over; no verification, so the output may part from the large model's (lossy by design, as BiLD's
rollback is).

Notation: M_S = small model, M_L = large model (the target), H_t = entropy in bits of the active model's
next-token distribution at step t, H̄_t = mean of the last `window` H, tau = threshold, c = tokens the active
model has written since it took over, d_min = `min_run`.
Each step the active model writes a token (its argmax, or a draw under the sampling rule); then
  M_(t+1) = M_L if H̄_t > tau and c >= d_min;  M_S if H̄_t <= tau and c >= d_min;  M_t otherwise
(d_min keeps the models from alternating every token). Each model keeps its own KV cache and catches up, in
one pass, on the tokens the other wrote while it was idle.
Recorded per token: its owner (`large` = 1 for M_L), H, H̄ and tau; the view draws the entropy trace with the
threshold, and the speculative benchmark reports agreement with M_L's greedy output next to the share of M_L
tokens. Departure: the paper pairs two sizes of one family (e.g. Llama 3.2 1B / 3.1 11B); offline the default
small model is the target with its middle quarter of layers skipped ('layer-skip'); any same-vocabulary model
id works where it can be loaded.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import param
from explorer.sampling import entropy
from explorer.strategies.base import commit_token, register
from explorer.strategies.draft_models import load_draft_model, sync_cache
from explorer.strategies.draft_verify import SpeculativeConfig, choose_plain


@dataclass(frozen=True)
class EadConfig(SpeculativeConfig):
    threshold: float = param(2.0, "tau: hand over to the large model while the rolling entropy is above this "
                                  "(bits)", minimum=0.0, maximum=16.0, step=0.05)
    window: int = param(5, "tokens in the rolling entropy", minimum=1, maximum=64, step=1)
    min_run: int = param(5, "d_min: tokens a model writes before a switch", minimum=1, maximum=64, step=1)
    small_model: str = param("layer-skip", "the small model: 'layer-skip' (the target minus its middle quarter of "
                                           "layers) or an HF id / local path of a model with the target's "
                                           "vocabulary", model=True)


def next_owner(large: bool, rolling: float, threshold: float, written: int, min_run: int) -> bool:
    """EAD's switching rule: whether the large model writes the next token."""
    if written < min_run:
        return large
    return rolling > threshold


def prepare(model: Any, config: EadConfig) -> None:
    load_draft_model(model, config.small_model)


@register("ead", EadConfig, "entropy-adaptive decoding: a small model hands over to the large one when unsure "
          "(lossy)", prepare=prepare, family="speed-up: draft-verify",
          paper="Simonds 2025, Entropy Adaptive Decoding, arXiv:2502.06833",
          reference_code="none public",
          departures=(
              "the default small model is the target with its middle quarter of layers skipped ('layer-skip'); "
              "the paper pairs two sizes of one family (e.g. Llama 3.2 1B / 3.1 11B)",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: EadConfig, rng: torch.Generator) -> Iterator[Event]:
    small = load_draft_model(model, config.small_model)
    sessions = {False: small.session(), True: model.session()}
    cached: dict[bool, list[int]] = {False: [], True: []}
    context = list(prompt_ids)
    recent: deque[float] = deque(maxlen=config.window)
    large, written = False, 0
    for step in itertools.count():
        logits = sync_cache(sessions[large], cached[large], context)  # (vocab,): catches up, then predicts
        bits = float(entropy(logits)) / math.log(2)
        recent.append(bits)
        rolling = sum(recent) / len(recent)
        token, kept = choose_plain(logits, config, context, rng)
        details = {"large": float(large), "entropy_bits": bits, "rolling_entropy": rolling,
                   "threshold": config.threshold}
        yield commit_token(model, step, len(context), token, logits, kept, details=details)
        context.append(token)
        written += 1
        switch = next_owner(large, rolling, config.threshold, written, config.min_run)
        if switch != large:
            large, written = switch, 0

