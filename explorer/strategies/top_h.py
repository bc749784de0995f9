"""Top-H decoding (Potraghloo et al. 2025, "Top-H Decoding: Adapting the Creativity and Coherence with
Bounded Entropy in Text Generation", arXiv:2509.02510).

Truncation as entropy-constrained mass maximisation: keep the most likely tokens while the entropy of the kept
set, renormalised, stays within alpha * H(p), with H(p) the entropy of the full distribution. The paper's
greedy algorithm adds tokens by decreasing probability and stops at the first one that breaks the bound.
Notation: p = model distribution (after temperature), q = p restricted to the kept set S and renormalised,
alpha in (0, 1]. With S_k = sum of the top-k probabilities and A_k = sum p_i ln p_i over them,
H(q_k) = ln S_k - A_k / S_k.
Departure: transformers' TopHLogitsWarper accumulates the un-renormalised terms -p ln p over the top 100 tokens
instead; we bound the entropy of the renormalised set, as the paper's constraint states, over the whole vocab.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import Checked, param
from explorer.sampling import NEG_INF, sample
from explorer.strategies.base import Choice, autoregressive, register


@dataclass(frozen=True)
class TopHConfig(Checked):
    alpha: float = param(0.4, "entropy bound as a fraction of H(p), in (0, 1]", minimum=0.01, maximum=1.0,
                         step=0.01)
    temperature: float = param(1.0, "divide logits by this (> 0)", minimum=0.05, maximum=3.0, step=0.05)

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        super().__post_init__()


def top_h_filter(logits: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float, float]:
    """Return (filtered logits, the bound alpha * H(p), entropy of the kept renormalised set)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    sorted_logp, order = torch.sort(logp, descending=True)
    sorted_p = sorted_logp.exp()
    terms = torch.where(sorted_p > 0, sorted_p * sorted_logp, torch.zeros_like(sorted_p))
    mass, weighted = sorted_p.cumsum(0), terms.cumsum(0)  # S_k, A_k
    kept_entropy = mass.log() - weighted / mass  # H(q_k) for every prefix k
    bound = alpha * float(-terms.sum())
    over = (kept_entropy > bound).nonzero()
    keep = int(over[0]) if len(over) else len(sorted_p)  # stop at the first violation
    keep = max(keep, 1)
    remove = torch.ones_like(logits, dtype=torch.bool)
    remove[order[:keep]] = False
    return logits.masked_fill(remove, NEG_INF), bound, float(kept_entropy[keep - 1])


@register("top_h", TopHConfig, "Top-H: keep tokens while the kept set's entropy stays under alpha * H",
          family="sampling",
          paper="Potraghloo et al. 2025, Top-H, arXiv:2509.02510")
def run(model: Any, prompt_ids: Sequence[int], config: TopHConfig, rng: torch.Generator) -> Iterator[Event]:
    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        kept, bound, kept_entropy = top_h_filter(logits / config.temperature, config.alpha)
        return Choice(sample(kept, rng), kept, {"bound": bound, "kept_entropy": kept_entropy})

    yield from autoregressive(model, prompt_ids, choose)
