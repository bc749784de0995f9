"""Mirostat (Basu, Ramachandran, Keskar, Varshney 2021, "Mirostat: A Neural Text Decoding Algorithm that
Directly Controls Perplexity", arXiv:2007.14966).

Notation: tau = target surprise (bits), eta = learning rate, mu = maximum allowed surprise (starts at 2 tau),
surprise S(x) = -log2 p(x) under the (temperature-scaled) model distribution, N = vocabulary size,
p_1 >= p_2 >= ... the sorted probabilities.

`version="1"` (default): the paper's Algorithm 1, which assumes the distribution is Zipfian.
1. Estimate the Zipf exponent from the top m = 100 probabilities by least squares (the paper's eq. 30):
   s_hat = sum_i t_i b_i / sum_i t_i^2, with t_i = ln((i+1)/i), b_i = ln(p_i / p_{i+1}), i = 1..m-1.
2. eps_hat = s_hat - 1; k = ((eps_hat 2^mu) / (1 - N^(-eps_hat)))^(1/s_hat), rounded (at least 1).
3. Sample x from the top k, renormalised. 4. e = S(x) - tau. 5. mu <- mu - eta e.

`version="2"`: "Mirostat 2.0" as llama.cpp implements it, which drops the Zipf estimate (it is not one of the
paper's numbered algorithms): 1. keep the tokens with S(x) <= mu; 3.-5. as above.
The kept set always holds at least the top token (the paper's set would be empty when even the top token
is more surprising than mu).
Departure (version 1): when s_hat <= 1 (a tail at least as heavy as Zipf with exponent 1) the formula has no
finite positive k; we floor eps_hat at MIN_EPSILON, and compute k in logs (2^mu overflows for large mu).
Departure (version 1, from the authors' mirostat.py): they sample from the top k + 1 and fit s_hat on 100 ratios
(p_1 .. p_101); we keep the top k and m - 1 = 99 ratios, as Algorithm 1 writes it. Default eta = 0.1 is
llama.cpp's; the authors' script runs learning rate 1.
Departure (version 2, found in the fidelity review, not fixed): the observed surprise S(x) is taken under the full
distribution; llama.cpp (llama_sampler_mirostat_v2_apply) takes it under the truncated set renormalised, so
its feedback sees smaller surprises and mu settles differently.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import Checked, param
from explorer.sampling import NEG_INF, sample, top_k_filter
from explorer.strategies.base import Choice, autoregressive, register

ZIPF_TOKENS = 100  # m: how many of the top probabilities estimate s
VERSIONS = ("1", "2")
MIN_EPSILON = 1e-3


@dataclass(frozen=True)
class MirostatConfig(Checked):
    tau: float = param(3.0, "target surprise in bits (> 0)", minimum=0.1, maximum=10.0, step=0.1)
    eta: float = param(0.1, "learning rate of mu (> 0)", minimum=0.01, maximum=1.0, step=0.01)
    temperature: float = param(1.0, "divide logits by this (> 0)", minimum=0.05, maximum=3.0, step=0.05)
    version: str = param("1", "1: the paper's Algorithm 1 (Zipf estimate, top-k); 2: truncate at surprise mu",
                         choices=VERSIONS)

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError("tau must be > 0 (the target surprise in bits)")
        super().__post_init__()


def surprise_bits(logits: torch.Tensor) -> torch.Tensor:
    """-log2 p for every token, `(vocab,)`."""
    return -torch.log_softmax(logits, dim=-1) / math.log(2)


def zipf_exponent(logits: torch.Tensor, m: int = ZIPF_TOKENS) -> float:
    """Step 1 of Algorithm 1: the least-squares Zipf exponent s_hat of the top-m probabilities."""
    top = torch.topk(torch.log_softmax(logits.double(), dim=-1), min(m, logits.shape[-1])).values  # ln p_i, sorted
    if len(top) < 2:
        return 1.0 + MIN_EPSILON
    b = (top[:-1] - top[1:]).nan_to_num(0.0, posinf=0.0)  # ln(p_i / p_{i+1})
    i = torch.arange(1, len(top), dtype=torch.float64, device=top.device)
    t = torch.log((i + 1) / i)
    return float((t * b).sum() / (t * t).sum())


def zipf_top_k(s_hat: float, mu: float, vocab: int) -> int:
    """Step 2 of Algorithm 1: k = ((eps 2^mu) / (1 - N^-eps))^(1/s), eps = s - 1, clipped to [1, N]."""
    eps = max(s_hat - 1.0, MIN_EPSILON)
    s_hat = max(s_hat, 1.0 + MIN_EPSILON)
    log_k = (math.log(eps) + mu * math.log(2) - math.log1p(-vocab ** -eps)) / s_hat  # in logs: 2^mu overflows
    return int(min(max(round(math.exp(min(log_k, math.log(vocab)))), 1), vocab))


def mirostat_truncate(logits: torch.Tensor, mu: float) -> torch.Tensor:
    """Version 2, step 1: remove tokens more surprising than mu (never the top token)."""
    surprise = surprise_bits(logits)
    remove = surprise > mu
    remove[torch.argmax(logits)] = False
    return logits.masked_fill(remove, NEG_INF)


@register("mirostat", MirostatConfig, "Mirostat: adaptive truncation toward a target surprise",
          family="sampling",
          paper="Basu et al. 2021, Mirostat, arXiv:2007.14966",
          reference_code=("basusourya/mirostat: mirostat.py: estimate_s, compute_k and the sampling loop (version 1); "
                          "ggml-org/llama.cpp: src/llama-sampling.cpp: llama_sampler_mirostat_v2_apply (version 2)"),
          departures=(
              "version 1: when s_hat <= 1 the paper's k has no finite positive value; eps_hat is floored at "
              "1e-3 and k computed in logs, clipped to [1, N]",
              "version 1: top k tokens and a Zipf fit on 99 ratios of the top 100 (Algorithm 1 as written); the "
              "authors' mirostat.py keeps the top k + 1 and fits 100 ratios (p_1 .. p_101)",
              "default eta = 0.1 (llama.cpp's default); the authors' mirostat.py uses learning rate 1",
              "version 2 is llama.cpp's truncation at surprise mu, not one of the paper's numbered algorithms",
              "review finding, not fixed: version 2 measures the observed surprise under the full (temperature-scaled) "
              "distribution; llama.cpp's llama_sampler_mirostat_v2_apply measures it under the truncated set "
              "renormalised, so mu is updated from different errors",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: MirostatConfig, rng: torch.Generator) -> Iterator[Event]:
    mu = 2.0 * config.tau

    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        nonlocal mu
        scaled = logits / config.temperature
        details = {"mu": mu, "target": config.tau}
        if config.version == "1":
            s_hat = zipf_exponent(scaled)  # 1.
            k = zipf_top_k(s_hat, mu, scaled.shape[-1])  # 2.
            kept = top_k_filter(scaled, k)
            details |= {"zipf_s": s_hat, "k": float(k)}
        else:
            kept = mirostat_truncate(scaled, mu)
        token = sample(kept, rng)  # 3.
        # Departure (version 2): llama.cpp measures this under the truncated, renormalised distribution.
        observed = float(surprise_bits(scaled)[token])
        details["surprise"] = observed
        mu -= config.eta * (observed - config.tau)  # 4.-5.
        return Choice(token, kept, details)

    yield from autoregressive(model, prompt_ids, choose)
