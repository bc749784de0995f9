"""Mirostat 2.0 (Basu, Ramachandran, Keskar, Varshney 2021, "Mirostat: A Neural Text Decoding Algorithm
that Directly Controls Perplexity", arXiv:2007.14966, Algorithm 2).

Notation: tau = target surprise (bits), eta = learning rate, mu = maximum allowed surprise (starts at 2 tau),
surprise s(x) = -log2 p(x) under the (temperature-scaled) model distribution.
Each step: 1. keep the tokens with s(x) <= mu; 2. sample x from them, renormalised; 3. observe s(x);
4. mu <- mu - eta (s(x) - tau). The kept set always has at least the top token (the paper's set would be
empty when even the top token is more surprising than mu).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import Checked, param
from explorer.sampling import NEG_INF, sample
from explorer.strategies.base import Choice, autoregressive, register


@dataclass(frozen=True)
class MirostatConfig(Checked):
    tau: float = param(3.0, "target surprise in bits (> 0)", minimum=0.1, maximum=10.0, step=0.1)
    eta: float = param(0.1, "learning rate of mu (> 0)", minimum=0.01, maximum=1.0, step=0.01)
    temperature: float = param(1.0, "divide logits by this (> 0)", minimum=0.05, maximum=3.0, step=0.05)

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError("tau must be > 0 (the target surprise in bits)")
        super().__post_init__()


def surprise_bits(logits: torch.Tensor) -> torch.Tensor:
    """-log2 p for every token, `(vocab,)`."""
    return -torch.log_softmax(logits, dim=-1) / math.log(2)


def mirostat_truncate(logits: torch.Tensor, mu: float) -> torch.Tensor:
    """Step 1: remove tokens more surprising than mu (never the top token)."""
    surprise = surprise_bits(logits)
    remove = surprise > mu
    remove[torch.argmax(logits)] = False
    return logits.masked_fill(remove, NEG_INF)


@register("mirostat", MirostatConfig, "Mirostat v2: adaptive truncation toward a target surprise",
          family="sampling",
          paper="Basu et al. 2021, Mirostat, arXiv:2007.14966")
def run(model: Any, prompt_ids: Sequence[int], config: MirostatConfig, rng: torch.Generator) -> Iterator[Event]:
    mu = 2.0 * config.tau

    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        nonlocal mu
        scaled = logits / config.temperature
        kept = mirostat_truncate(scaled, mu)  # 1.
        token = sample(kept, rng)  # 2.
        observed = float(surprise_bits(scaled)[token])  # 3.
        details = {"mu": mu, "surprise": observed, "target": config.tau}
        mu -= config.eta * (observed - config.tau)  # 4.
        return Choice(token, kept, details)

    yield from autoregressive(model, prompt_ids, choose)
