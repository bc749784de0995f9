"""The draft-verify engine shared by every drafter: propose -> verify -> accept -> commit.

Speculative sampling (Leviathan, Kalman, Matias 2023, "Fast Inference from Transformers via Speculative
Decoding", arXiv:2211.17192, Algorithm 1; Chen et al. 2023, arXiv:2302.01318). Notation: p = target
distribution, q = draft distribution, gamma = draft length, u ~ U(0, 1).
  For i = 1..gamma: accept draft token x_i if u_i < min(1, p_i(x_i) / q_i(x_i)); otherwise sample the
  correction from residual(p_i, q_i) = norm(max(0, p_i - q_i)) and stop. After full acceptance, sample the
  bonus token from p_{gamma+1}. The output is distributed exactly as p.
Greedy rule: accept x_i while it equals argmax of the target's logits; the first mismatch is replaced by the
target's argmax (so the output is token-identical to greedy decoding).

A chain is a tree with one child per node: `verify_tree` verifies both, in one pass of the target.
Drafters implement `propose(context) -> DraftTree` and optionally `observe(verdict)`. A deterministic drafter
(prompt lookup, Jacobi) gives no q distributions: its q is a point mass on the drafted token, for which the
rule above still gives exactly p.

KV cache discipline: the target's cache holds every committed token but the last; a round runs the target once
over [last committed token, draft...] (gamma + 1 positions), then crops the cache back to the committed prefix
plus the accepted draft tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from explorer.events import DraftRound
from explorer.sampling import SamplingFilters, step_stats
from explorer.strategies.base import RECORD_TOP_K, param, token_step

RULES = ("greedy", "sampling")


# ------------------------------------------------------------------------------------------- the math
def accept_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """min(1, p / q) elementwise (1 where q = 0: such tokens are never drafted)."""
    return torch.where(q > 0, torch.clamp(p / q.clamp_min(1e-30), max=1.0), torch.ones_like(p))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to sample the correction after a rejection (p itself if p <= q everywhere)."""
    excess = torch.clamp(p - q, min=0.0)
    total = excess.sum()
    return excess / total if total > 0 else p


# ------------------------------------------------------------------------------------------ the draft
@dataclass
class DraftTree:
    """Draft tokens with one parent index each (-1: the committed prefix). `scores` are the draft's q of each
    token; `q_dists` the full q rows `(n, vocab)`, or None for deterministic drafters (point masses)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    q_dists: torch.Tensor | None = None
    details: dict[str, float] = field(default_factory=dict)
    mode: str = "iid"  # how siblings were drawn from q: iid, without_replacement, or point (deterministic)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    @classmethod
    def chain(cls, tokens: Sequence[int], scores: Sequence[float] | None = None,
              q_dists: torch.Tensor | None = None, **details: float) -> DraftTree:
        tokens = list(tokens)
        return cls(tokens, list(range(-1, len(tokens) - 1)), list(scores or [1.0] * len(tokens)), q_dists,
                   dict(details))


@dataclass
class Verdict:
    accepted_count: int
    bonus_token: int
    bonus_kind: str  # "correction" after a rejection, "bonus" after full acceptance
    p: list[float]
    q: list[float]
    u: list[float | None]
    verdicts: list[str]
    target_argmax: list[int]  # the target's argmax at every verified position (Jacobi's next guesses)
    hidden_states: torch.Tensor | None = None  # (layers + 1, gamma + 1, hidden) when the drafter asks for them
    path: list[int] = field(default_factory=list)  # accepted draft nodes, root to leaf

    def __post_init__(self) -> None:
        self.path = self.path or list(range(self.accepted_count))


class Drafter(Protocol):
    name: str

    def propose(self, context: Sequence[int]) -> DraftTree: ...

    def observe(self, verdict: Verdict) -> None: ...


# --------------------------------------------------------------------------------------- verification
def verify_tree(logits: torch.Tensor, draft: DraftTree, rule: str, filters: SamplingFilters,
                context: Sequence[int], rng: torch.Generator) -> Verdict:
    """Verify a draft tree against target logits `(nodes + 1, vocab)`: row 0 predicts the root's children, row
    i + 1 the children of node i. Walks down from the root, accepting at most one child per node.

    Greedy rule: follow the child equal to the target's argmax. Sampling rule (multi-draft recursive rejection
    sampling; SpecInfer, Miao et al. 2024, arXiv:2305.09781; Recursive Speculative Decoding, Jeon et al. 2024,
    arXiv:2402.14160): try the children in order; child x is accepted with probability min(1, p(x) / q(x));
    after a rejection p <- norm(max(0, p - q)), and for children drawn without replacement q also loses x
    (renormalised). If every child is rejected the correction is drawn from what is left of p. Deterministic
    children (mode point) have q = a point mass, so the output is distributed exactly as p in every mode."""
    n = len(draft.tokens)
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(draft.parents):
        children.setdefault(parent, []).append(node)
    argmax = logits.argmax(dim=-1).tolist()
    p_list: list[float | None] = [None] * n
    u_list: list[float | None] = [None] * n
    q_list = [float(x) for x in draft.scores]
    verdicts = ["unreached"] * n
    path: list[int] = []
    history = list(context)
    current = -1
    while True:
        row = logits[current + 1]
        kids = children.get(current, [])
        if rule == "greedy":
            probs = torch.softmax(row, dim=-1)
            for kid in kids:
                p_list[kid] = float(probs[draft.tokens[kid]])
            match = next((k for k in kids if draft.tokens[k] == argmax[current + 1]), None)
            for kid in kids:
                verdicts[kid] = "accepted" if kid == match else "rejected"
            if match is None:
                bonus = argmax[current + 1]
                break
            path.append(match)
            current = match
            continue
        p = torch.softmax(filters.apply(row, history), dim=-1)
        q = None if draft.q_dists is None or draft.mode == "point" or not kids else draft.q_dists[kids[0]].clone()
        accepted = None
        for kid in kids:
            token = draft.tokens[kid]
            q_kid = q if q is not None else _point_mass(token, p)
            p_list[kid], q_list[kid] = float(p[token]), float(q_kid[token])
            u = float(torch.rand((), generator=rng, device=rng.device))
            u_list[kid] = u
            if u < float(accept_probability(p[token], q_kid[token])):
                accepted = kid
                break
            verdicts[kid] = "rejected"
            p = residual(p, q_kid)
            if q is not None and draft.mode == "without_replacement":
                q[token] = 0.0
                q = q / q.sum() if q.sum() > 0 else q
        if accepted is None:
            bonus = int(torch.multinomial(p, 1, generator=rng))
            break
        verdicts[accepted] = "accepted"
        path.append(accepted)
        history.append(draft.tokens[accepted])
        current = accepted
    kind = "bonus" if not children.get(current) else "correction"
    return Verdict(len(path), bonus, kind, p_list, q_list, u_list, verdicts, argmax, path=path)


def _point_mass(token: int, like: torch.Tensor) -> torch.Tensor:
    mass = torch.zeros_like(like)
    mass[token] = 1.0
    return mass


# ------------------------------------------------------------------------------------------ the loop
@dataclass(frozen=True)
class SpeculativeConfig(SamplingFilters):
    """Fields every draft-verify strategy shares: the acceptance rule and (for the sampling rule) the
    sampling filters, applied to both p and q."""

    rule: str = param("greedy", "acceptance rule: greedy (exact match) or sampling (min(1, p/q))",
                      choices=RULES)
    temperature: float = param(1.0, "sampling rule: divide logits by this (> 0)", minimum=0.05, maximum=3.0,
                               step=0.05)
    top_k: int = param(0, "sampling rule: top-k (0 = off)", minimum=0, maximum=200, step=1)
    top_p: float = param(1.0, "sampling rule: top-p (1 = off)", minimum=0.01, maximum=1.0, step=0.01)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}")


def choose_plain(logits: torch.Tensor, config: SpeculativeConfig, context: Sequence[int],
                 rng: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """One ordinary decoding step (no draft): argmax, or a draw from the filtered distribution."""
    if config.rule == "greedy":
        return int(torch.argmax(logits)), None
    kept = config.apply(logits, context)
    return int(torch.multinomial(torch.softmax(kept, dim=-1), 1, generator=rng)), kept


def draft_verify(model: Any, prompt_ids: Sequence[int], drafter: Drafter, config: SpeculativeConfig,
                 rng: torch.Generator) -> Iterator[Any]:
    """Yield a DraftRound per verification and a TokenStep per committed token."""
    session = model.session()
    context = list(prompt_ids)
    watching = hasattr(drafter, "observe_logits")  # drafters that learn from every target pass
    if len(context) > 1:
        prefill = session.forward(context[:-1], all_logits=watching)  # the last token goes in with the draft
        if watching:
            drafter.observe_logits(context[:-1], prefill, None)
    step = 0
    for round_index in range(10**9):
        t0 = time.perf_counter()
        draft = drafter.propose(context)  # 1. propose
        t1 = time.perf_counter()
        wants_hidden = bool(draft.tokens) and getattr(drafter, "wants_hidden_states", False)
        chain = draft.is_chain
        parents = None if chain else [-1] + [parent + 1 for parent in draft.parents]  # the last token is the root
        out = session.forward([context[-1], *draft.tokens], parents=parents, hidden_states=wants_hidden)  # 2.
        logits, hidden = out if wants_hidden else (out, None)  # logits: (nodes + 1, vocab)
        if watching:
            drafter.observe_logits([context[-1], *draft.tokens], logits, parents)
        if not draft.tokens:
            token, kept = choose_plain(logits[0], config, context, rng)
            yield _committed(model, step, context, logits[0], kept, token, "plain")
            step += 1
            context.append(token)
            continue
        verdict = verify_tree(logits, draft, config.rule, config, context, rng)  # 3. accept
        verdict.hidden_states = hidden
        t2 = time.perf_counter()
        accepted = [draft.tokens[node] for node in verdict.path]
        if chain:
            session.crop(len(context) + verdict.accepted_count)  # 4. commit: drop the rejected drafts' KV
        else:  # keep the prefix (with the last token) and the accepted path's nodes
            session.keep([*range(len(context)), *(len(context) + node for node in verdict.path)])
        drafter.observe(verdict)
        draft.details.update(getattr(drafter, "round_details", dict)())
        yield DraftRound(
            round=round_index, position=len(context), drafter=drafter.name, rule=config.rule,
            draft_tokens=list(draft.tokens), draft_texts=[model.piece(t) for t in draft.tokens],
            parents=list(draft.parents), q=[float(x) for x in verdict.q], p=verdict.p, u=verdict.u,
            verdicts=verdict.verdicts, accepted_count=verdict.accepted_count, bonus_token=verdict.bonus_token,
            bonus_text=model.piece(verdict.bonus_token), bonus_kind=verdict.bonus_kind, draft_time_s=t1 - t0,
            verify_time_s=t2 - t1, details=dict(draft.details),
        )
        if hasattr(drafter, "drain_events"):  # what the drafter learned this round (e.g. pool updates)
            yield from drafter.drain_events(round_index, model.piece)
        rows = [0, *(node + 1 for node in verdict.path)]  # the logits row each committed token was drawn from
        for i, token in enumerate([*accepted, verdict.bonus_token]):
            origin = "draft" if i < len(accepted) else "bonus"
            kept = None if config.rule == "greedy" else config.apply(logits[rows[i]], context)
            yield _committed(model, step, context, logits[rows[i]], kept, token, origin)
            step += 1
            context.append(token)


def _committed(model: Any, step: int, context: list[int], raw: torch.Tensor, kept: torch.Tensor | None,
               token: int, origin: str) -> Any:
    stats = step_stats(raw, kept, token, RECORD_TOP_K)
    return token_step(model, step, len(context), token, stats, {}, origin)


# ---------------------------------------------------------------------------------- adaptive lengths
@dataclass
class DraftLength:
    """Draft length gamma: doubles after a fully accepted draft and falls back to the accepted count plus one
    after a rejection (never below 1 or above the maximum). Starts at `start` (default: the maximum)."""

    maximum: int
    adaptive: bool = True
    start: int = 0
    current: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.current = min(self.start, self.maximum) if self.adaptive and self.start else self.maximum

    def update(self, verdict: Verdict, drafted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        if verdict.accepted_count == drafted:
            self.current = min(2 * self.current, self.maximum)
        else:
            self.current = max(1, min(self.current - 1, verdict.accepted_count + 1))
