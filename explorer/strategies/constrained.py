"""Constrained decoding with adaptive weighted rejection sampling, AWRS (Lipkin, LeBrun, Vigly, Loula, MacIver, Du,
Eisner, Cotterell, Mansinghka, O'Donnell, Lew, Vieira 2025, "Fast Controlled Generation from Language Models with
Adaptive Weighted Rejection Sampling", arXiv:2504.05410), beside the usual full-vocabulary masking.

Notation: p = the model's next-token distribution (after the temperature), C = the constraint's verdict on a
token (explorer.constraints: a regex or JSON schema through llguidance), g(x) = p(x) C(x) / Z the constrained
distribution, Z = sum_x p(x) C(x) (the local probability that the constraint holds).
- mask (the baseline, "locally constrained decoding"): evaluate C on every token (|V| evaluations), draw from g.
- awrs: adaptive rejection sampling without replacement: order the tokens by log p(x) + Gumbel noise (a draw
  of the whole order without replacement) and walk it, evaluating C only on the tokens reached; the first
  allowed token x is an exact draw from g. The weight: with R = the mass of the tokens rejected before x and
  q_i = p(x_i) / (1 - R_i) each one's probability among those not yet tried, the estimate
  w = prod_rejected (1 - q_i) * (1 if the next token in the order is allowed, else q_x)
  is unbiased for Z (the paper's recursive estimator: E[w] = Z, tested), at the cost of one more evaluation;
  log w is recorded per token and summed over the sequence: the importance weight that sequential Monte Carlo
  over many such samples uses to correct the myopia of local constraints.
Recorded per token: evaluations, rejected tokens, log w (and its running sum); with `compare`, also the exact
log Z and the |V| evaluations masking would have made, so the view shows both side by side.
Departures: one particle (the paper's SMC over many particles, resampling on these weights, is not run here;
the weights it needs are recorded); the recursive estimator only (the paper also gives a geometric variant for
peaked distributions). The authors' released sampler (awrs-colm-2025 experiments/sampler.py, AWRS.sample) uses a
different unbiased weight: it runs a second rejection round past the accepted token and returns
Z * (1 - R) / (N + 1), N = the rejections of both rounds; ours spends one extra evaluation instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.constraints import KINDS, MAX_PATTERN, GrammarConstraint
from explorer.events import Event
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register

METHODS = ("awrs", "mask")
CHUNK = 64  # tokens of the Gumbel order materialised at a time (the walk rarely goes further)


@dataclass(frozen=True)
class ConstrainedConfig(Checked):
    kind: str = param("regex", "constraint kind: regex or json_schema", choices=KINDS)
    pattern: str = param(r"(Yes|No), because [a-z ,]{10,80}\.", "the regex or JSON schema the output must match")
    method: str = param("awrs", "awrs: sample, then check (adaptive rejection); mask: check every token first",
                        choices=METHODS)
    temperature: float = param(1.0, "divide logits by this (> 0)", minimum=0.05, maximum=3.0, step=0.05)
    compare: bool = param(False, "also compute the full mask each step: exact log Z and the evaluations masking "
                                 "needs, beside AWRS's")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.pattern.strip() or len(self.pattern) > MAX_PATTERN:
            raise ValueError(f"pattern must be a regex or JSON schema of 1 to {MAX_PATTERN} characters")


@dataclass(frozen=True)
class AwrsDraw:
    token: int | None  # None: no token is allowed
    log_weight: float  # log of the unbiased estimate of Z (-inf when nothing is allowed)
    evaluations: int
    rejected: list[int]


def awrs_step(logp: torch.Tensor, allows: Callable[[int], bool], rng: torch.Generator) -> AwrsDraw:
    """One AWRS draw from g = p C / Z and its weight (recursive estimator), `logp` `(vocab,)`."""
    uniform = torch.rand(logp.shape, generator=rng, device=logp.device, dtype=torch.float64).clamp(1e-300, 1.0)
    keys = logp.double() - torch.log(-torch.log(uniform))  # Gumbel-perturbed: the order is a draw w/o replacement
    keys[torch.isinf(logp)] = -math.inf
    order = torch.topk(keys, min(CHUNK, keys.numel())).indices.tolist()
    evaluations, rejected, rejected_mass, log_multiplier = 0, [], 0.0, 0.0
    for position in itertools.count():
        if position == len(order) and len(order) < keys.numel():
            order = torch.argsort(keys, descending=True).tolist()  # a deep walk: the whole order
        if position >= len(order) or keys[order[position]] == -math.inf:
            return AwrsDraw(None, -math.inf, evaluations, rejected)  # every token with mass was rejected
        token = order[position]
        log_q = min(0.0, float(logp[token]) - math.log1p(-min(rejected_mass, 1 - 1e-12)))
        evaluations += 1
        if allows(token):
            following = order[position + 1] if position + 1 < len(order) else None
            if following is None or keys[following] == -math.inf:
                tail = 0.0  # x holds all the mass left: Z of what is left is q_x = 1
            else:
                evaluations += 1
                tail = 0.0 if allows(following) else log_q
            return AwrsDraw(token, log_multiplier + tail, evaluations, rejected)
        rejected.append(token)
        rejected_mass += math.exp(float(logp[token]))
        log_multiplier += math.log(-math.expm1(log_q)) if log_q < 0 else -math.inf


def masked_step(logp: torch.Tensor, allowed: torch.Tensor, rng: torch.Generator) -> tuple[int | None, float]:
    """The masking baseline: a draw from p restricted to `allowed` `(vocab,)` bool, and the exact log Z."""
    kept = logp.masked_fill(~allowed, -math.inf)
    log_z = float(torch.logsumexp(kept, dim=-1))
    if log_z == -math.inf:
        return None, log_z
    return int(torch.multinomial(torch.softmax(kept, dim=-1), 1, generator=rng)), log_z


def prepare(model: Any, config: ConstrainedConfig) -> None:
    GrammarConstraint(model.tokenizer, config.kind, config.pattern)  # a pattern that does not compile: one line, no run


@register("constrained", ConstrainedConfig, "constrained decoding (regex / JSON schema): AWRS or full masking",
          prepare=prepare, family="sampling", paper="Lipkin et al. 2025, AWRS, arXiv:2504.05410",
          reference_code=("genlm/awrs-colm-2025: experiments/sampler.py: AWRS.sample (the same estimator ships in "
                          "genlm/genlm-control: genlm/control/sampler/token.py)"),
          departures=(
              "one particle: the paper's sequential Monte Carlo over many particles (resampling on these weights) "
              "is not run; the per-token and summed log-weights it would use are recorded",
              "weight estimator: (1 - R) x (1 if the next token in the Gumbel order is allowed, else q_x), one "
              "extra evaluation; the authors' AWRS.sample runs a second rejection round and returns "
              "Z (1 - R) / (N + 1), N = rejections over both rounds (both unbiased for Z; different variances)",
              "the paper's geometric estimator variant for peaked distributions is not offered",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: ConstrainedConfig, rng: torch.Generator) -> Iterator[Event]:
    constraint = GrammarConstraint(model.tokenizer, config.kind, config.pattern)
    vocab = model.model.config.vocab_size
    session = model.session()
    logits = session.forward(list(prompt_ids), all_logits=False).logits[-1]  # (vocab,)
    context, total = list(prompt_ids), 0.0
    for step in itertools.count():
        logp = torch.log_softmax(logits.float() / config.temperature, dim=-1)
        before = constraint.evaluations
        details: dict[str, float] = {}
        if constraint.finished:  # the output is complete: the end token is the one token allowed, Z = p(end)
            token, log_w = constraint.eos, float(logp[constraint.eos])
        elif config.method == "awrs":
            draw = awrs_step(logp, constraint.allows, rng)
            token, log_w = draw.token, draw.log_weight
            details["rejected"] = float(len(draw.rejected))
        else:
            allowed = constraint.mask(vocab)
            token, log_w = masked_step(logp, allowed, rng)
        details["evaluations"] = float(constraint.evaluations - before)
        if config.compare:
            mask = constraint.mask(vocab)
            constraint.evaluations -= vocab  # the comparison's evaluations are not the method's
            details["exact_log_z"] = float(torch.logsumexp(logp.masked_fill(~mask, -math.inf), dim=-1))
            details["mask_evaluations"] = float(vocab)
        if token is None:
            raise ValueError(f"the constraint admits no token after {step} generated tokens: loosen the "
                             f"{config.kind.replace('_', ' ')}")
        total += log_w
        details.update(log_weight=log_w, log_weight_total=total)
        constraint.advance(token)
        kept = logits.float() / config.temperature
        yield commit_token(model, step, len(context), token, logits, kept, details=details)
        context.append(token)
        logits = session.forward([token]).logits[-1]
