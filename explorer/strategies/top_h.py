"""Top-H decoding (Potraghloo et al. 2025, "Top-H Decoding: Adapting the Creativity and Coherence with
Bounded Entropy in Text Generation", arXiv:2509.02510).

Truncation as entropy-constrained mass maximisation (the paper's ECMM problem), solved by its greedy
algorithm: add tokens by decreasing probability and stop at the first one that breaks the entropy bound.
Notation: p = model distribution (after temperature), S = the kept set, alpha in (0, 1] (the paper's top_h),
tau = alpha * H(p) the bound.

Two bounds, named by `bound`:
- "paper" (default): transformers' `TopHLogitsWarper`, an adaptation of the authors' released logits processor
  (not identical to it: see the departure below). p is renormalised over the `TOP_N` = 100 most likely
  tokens, H = H(p) over those, and the kept set grows while the *unnormalised* partial entropy
  -sum_{i in S} p_i ln p_i stays <= alpha * H.
- "renormalised" (our first reading of the paper's constraint, a named variant): q = p restricted to S and
  renormalised, bounded by H(q) <= alpha * H(p) with H over the whole vocabulary. With S_k = sum of the top-k
  probabilities and A_k = sum p_i ln p_i over them, H(q_k) = ln S_k - A_k / S_k. It keeps more tokens than
  the paper's rule (at alpha 0.4 and temperature 1.5 on the embedded model, a median 13 against 5).
Departure ("paper" bound, found in the fidelity review, not fixed): the authors' logit_processor.py does not
renormalise over the top 100. With p the full-vocabulary probabilities, it keeps the prefix whose partial entropy
-sum_S p ln p stays <= alpha * (-sum over the top 100 of p ln p). Transformers' TopHLogitsWarper, which we
follow, renormalises p over the top 100 first, and the kept sets differ whenever the top-100 mass is below 1.
Both cap the search at the top 100 tokens; the paper's ECMM problem ranges over the whole vocabulary.
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

TOP_N = 100  # tokens the paper's bound looks at (the authors' and transformers' cap)
BOUNDS = ("paper", "renormalised")


@dataclass(frozen=True)
class TopHConfig(Checked):
    alpha: float = param(0.4, "entropy bound as a fraction of H(p), in (0, 1]", minimum=0.01, maximum=1.0,
                         step=0.01)
    temperature: float = param(1.0, "divide logits by this (> 0)", minimum=0.05, maximum=3.0, step=0.05)
    bound: str = param("paper", "paper: the authors' partial-entropy rule over the top 100 (as transformers); "
                                "renormalised: entropy of the kept set renormalised, over the whole vocabulary",
                       choices=BOUNDS)

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        super().__post_init__()


def _keep_top(logits: torch.Tensor, order: torch.Tensor, keep: int) -> torch.Tensor:
    remove = torch.ones_like(logits, dtype=torch.bool)
    remove[order[:max(keep, 1)]] = False
    return logits.masked_fill(remove, NEG_INF)


def top_h_filter(logits: torch.Tensor, alpha: float, bound: str = "paper") -> tuple[torch.Tensor, float, float]:
    """Return (filtered logits `(vocab,)`, the bound tau, the kept set's entropy under the chosen rule):
    the partial entropy -sum_S p ln p for "paper", H(q) of the renormalised kept set for "renormalised"."""
    if bound == "paper":
        top_logits, order = torch.topk(logits.double(), min(TOP_N, logits.shape[-1]))  # sorted, descending
        # p renormalised over the top n (transformers); departure: the authors' code keeps the full-vocabulary p
        logp = torch.log_softmax(top_logits, dim=-1)
        terms = -(logp.exp() * logp).nan_to_num(0.0)  # -p ln p; 0 where p underflows
        tau = alpha * float(terms.sum())
        partial = terms.cumsum(0)
        keep = max(int((partial <= tau).sum()), 1)  # cumsum is monotone: the kept prefix
        return _keep_top(logits, order, keep), tau, float(partial[keep - 1])
    if bound != "renormalised":
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}")
    logp = torch.log_softmax(logits.double(), dim=-1)
    sorted_logp, order = torch.sort(logp, descending=True)
    sorted_p = sorted_logp.exp()
    terms = torch.where(sorted_p > 0, sorted_p * sorted_logp, torch.zeros_like(sorted_p))
    mass, weighted = sorted_p.cumsum(0), terms.cumsum(0)  # S_k, A_k
    kept_entropy = mass.log() - weighted / mass  # H(q_k) for every prefix k
    tau = alpha * float(-terms.sum())
    over = (kept_entropy > tau).nonzero()
    keep = max(int(over[0]) if len(over) else len(sorted_p), 1)  # stop at the first violation
    return _keep_top(logits, order, keep), tau, float(kept_entropy[keep - 1])


@register("top_h", TopHConfig, "Top-H: keep tokens while their entropy stays under alpha * H",
          family="sampling",
          paper="Potraghloo et al. 2025, Top-H, arXiv:2509.02510",
          reference_code="ErfanBaghaei/Top-H-Decoding: logit_processor.py: TopH_LogitsProcessor.__call__",
          departures=(
              "review finding, not fixed: "
              "bound='paper' renormalises p over the top 100 before taking the partial entropies "
              "(transformers' TopHLogitsWarper); the authors' TopH_LogitsProcessor uses the full-vocabulary "
              "probabilities of the top 100 unrenormalised, so the kept set differs whenever the top-100 mass < 1",
              "bound='paper' searches only the top 100 tokens, as both released codes do; the paper's ECMM "
              "problem ranges over the whole vocabulary",
              "bound='renormalised' (H(q) <= alpha * H(p) over the whole vocabulary) is our own reading, not the "
              "authors' rule",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: TopHConfig, rng: torch.Generator) -> Iterator[Event]:
    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        kept, tau, kept_entropy = top_h_filter(logits / config.temperature, config.alpha, config.bound)
        return Choice(sample(kept, rng), kept, {"bound": tau, "kept_entropy": kept_entropy})

    yield from autoregressive(model, prompt_ids, choose)
