"""Pure math on next-token logits: entropy, the sampling filters, and what a TokenStep records.

Filters take logits `(..., vocab)` and return new logits where removed tokens are -inf; each keeps at least the
most likely token. They follow the definitions (and the order, see `SamplingFilters`) of transformers' logits
processors, which the tests check them against on random logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from explorer.params import Checked, param

NEG_INF = float("-inf")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits) over the last axis; -inf logits contribute nothing."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


def _keep_top1(logits: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """Never remove the argmax (min_tokens_to_keep = 1)."""
    top = logits.argmax(dim=-1, keepdim=True)
    return remove.scatter(-1, top, False)


def temperature(logits: torch.Tensor, value: float) -> torch.Tensor:
    return logits / value


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their mass reaches p (the token that crosses p is kept)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the top token's."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(_keep_top1(logits, probs < threshold), NEG_INF)


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2023): keep the tokens whose surprise is closest to the
    entropy until their mass reaches `mass`. Unlike the other filters, the token always kept is the most
    typical one, not the argmax."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    ent = -(p * logp).nansum(-1, keepdim=True)
    distance = (-logp - ent).abs()
    order = torch.sort(distance, dim=-1).indices
    sorted_p = p.gather(-1, order)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    remove_sorted = mass_before >= mass
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)  # keeps at least the most typical token, as transformers


def epsilon_filter(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Epsilon sampling (Hewitt et al. 2022): drop tokens with probability below epsilon."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(_keep_top1(logits, probs < epsilon), NEG_INF)


def eta_filter(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eta sampling (Hewitt et al. 2022): threshold min(eps, sqrt(eps) * exp(-entropy))."""
    probs = logits.softmax(dim=-1)
    eta = torch.clamp(math.sqrt(epsilon) * torch.exp(-entropy(logits)), max=epsilon)[..., None]
    return logits.masked_fill(_keep_top1(logits, probs < eta), NEG_INF)


def repetition_penalty(logits: torch.Tensor, context_ids: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) on every token already in the context (prompt included)."""
    if penalty == 1.0 or not context_ids:
        return logits
    index = torch.as_tensor(sorted(set(context_ids)), dtype=torch.long, device=logits.device)
    seen = logits.index_select(-1, index)
    penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.index_copy(-1, index, penalised)


@dataclass(frozen=True)
class SamplingFilters(Checked):
    """The composable filters, applied in transformers' order: repetition penalty, temperature, top-k,
    top-p, min-p, typical, epsilon, eta. Neutral values switch a filter off."""

    temperature: float = param(1.0, "divide logits by this (> 0)", minimum=0.05, maximum=3.0, step=0.05)
    top_k: int = param(0, "keep the k most likely tokens (0 = off)", minimum=0, maximum=200, step=1)
    top_p: float = param(1.0, "nucleus: keep the most likely tokens up to mass p (1 = off)", minimum=0.01,
                         maximum=1.0, step=0.01)
    min_p: float = param(0.0, "keep tokens whose probability is at least min_p x the top token's (0 = off)",
                         minimum=0.0, maximum=0.99, step=0.01)
    typical_p: float = param(1.0, "locally typical: keep the tokens nearest the entropy up to this mass (1 = off)",
                             minimum=0.01, maximum=1.0, step=0.01)
    epsilon_cutoff: float = param(0.0, "drop tokens with probability below epsilon (0 = off)", minimum=0.0,
                                  maximum=0.5, step=0.0001)
    eta_cutoff: float = param(0.0, "eta sampling: drop tokens below min(eta, sqrt(eta)·exp(-entropy)) (0 = off)",
                              minimum=0.0, maximum=0.5, step=0.0001)
    repetition_penalty: float = param(1.0, "divide (or multiply, if negative) the logits of tokens already seen by "
                                      "this (1 = off)", minimum=0.5, maximum=2.0, step=0.01)

    def __post_init__(self) -> None:
        checks = [
            (self.temperature > 0, "temperature must be > 0 (use the greedy strategy for temperature 0)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 switches it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (0 < self.typical_p <= 1, "typical_p must be in (0, 1]"),
            (0 <= self.epsilon_cutoff < 1, "epsilon_cutoff must be in [0, 1)"),
            (0 <= self.eta_cutoff < 1, "eta_cutoff must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 switches it off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        super().__post_init__()  # the declared limits of a subclass's fields

    def apply(self, logits: torch.Tensor, context_ids: Sequence[int] = ()) -> torch.Tensor:
        if self.repetition_penalty != 1.0:
            logits = repetition_penalty(logits, context_ids, self.repetition_penalty)
        if self.temperature != 1.0:
            logits = temperature(logits, self.temperature)
        if self.top_k:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p > 0.0:
            logits = min_p_filter(logits, self.min_p)
        if self.typical_p < 1.0:
            logits = typical_filter(logits, self.typical_p)
        if self.epsilon_cutoff > 0.0:
            logits = epsilon_filter(logits, self.epsilon_cutoff)
        if self.eta_cutoff > 0.0:
            logits = eta_filter(logits, self.eta_cutoff)
        return logits


def sample(logits: torch.Tensor, rng: torch.Generator) -> int:
    """Draw one token id from softmax(logits) `(vocab,)` with an explicit generator."""
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng).item())


@dataclass(frozen=True)
class StepStats:
    """What a TokenStep records about one step, computed on the device with one transfer to Python."""

    logprob: float
    rank: int
    entropy: float
    top_ids: list[int]
    top_logprobs: list[float]
    kept_top_ids: list[int]
    kept_top_logprobs: list[float]
    kept_count: int
    kept_logprob: float


def step_stats(raw: torch.Tensor, kept: torch.Tensor | None, token_id: int, top_k: int = 10) -> StepStats:
    """Stats of raw logits `(vocab,)` and of the transformed logits the token was drawn from (None: same)."""
    k = min(top_k, raw.shape[-1])
    raw_logp = torch.log_softmax(raw.float(), dim=-1)
    raw_top = torch.topk(raw_logp, k)
    chosen = raw_logp[token_id]
    ent = -(raw_logp.exp() * raw_logp).sum()
    rank = (raw_logp > chosen).sum()
    if kept is None:
        kept_top, kept_count, kept_chosen = raw_top, torch.tensor(raw.shape[-1], device=raw.device), chosen
    else:
        kept_logp = torch.log_softmax(kept.float(), dim=-1)
        kept_top = torch.topk(kept_logp, k)
        kept_count, kept_chosen = torch.isfinite(kept_logp).sum(), kept_logp[token_id]
    # One device-to-host transfer for everything: (5 + 4k,) doubles.
    packed = torch.cat(
        [
            torch.stack([chosen, ent, rank.to(chosen.dtype), kept_count.to(chosen.dtype), kept_chosen]),
            raw_top.values, raw_top.indices.to(chosen.dtype), kept_top.values, kept_top.indices.to(chosen.dtype),
        ]
    ).double().tolist()
    head, rest = packed[:5], packed[5:]
    kept_logps = rest[2 * k : 3 * k]
    kept_ids = [int(i) for i in rest[3 * k :]]
    live = [i for i, value in enumerate(kept_logps) if value != NEG_INF]  # drop removed tokens from the top-k
    return StepStats(
        logprob=head[0],
        rank=int(head[2]),
        entropy=head[1],
        top_ids=[int(i) for i in rest[k : 2 * k]],
        top_logprobs=rest[:k],
        kept_top_ids=[kept_ids[i] for i in live],
        kept_top_logprobs=[kept_logps[i] for i in live],
        kept_count=int(head[3]),
        kept_logprob=head[4],
    )
