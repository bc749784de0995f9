"""The draft-verify engine shared by every drafter: propose -> verify -> accept -> commit.

Speculative sampling (Leviathan, Kalman, Matias 2023, "Fast Inference from Transformers via Speculative
Decoding", arXiv:2211.17192, Algorithm 1; Chen et al. 2023, arXiv:2302.01318). Notation: p = target
distribution, q = draft distribution, gamma = draft length, u ~ U(0, 1).
  For i = 1..gamma: accept draft token x_i if u_i < min(1, p_i(x_i) / q_i(x_i)); otherwise sample the
  correction from residual(p_i, q_i) = norm(max(0, p_i - q_i)) and stop. After full acceptance, sample the
  bonus token from p_{gamma+1}. The output is distributed exactly as p.
Greedy rule: accept x_i while it equals argmax of the target's logits; the first mismatch is replaced by the
target's argmax (so the output is token-identical to greedy decoding).

A chain is a tree with one child per node: both are verified in one pass of the target, and judged by the
strategy's acceptance rule (`strategies/acceptance.py`: the rules above, `GreedyMatch` and `RejectionSampling`,
are the default; SpecTr's, BiLD's and Medusa's live with those strategies).
Drafters subclass `Drafter`: `propose(context) -> DraftTree` is required, the other hooks have no-op defaults.
A deterministic drafter (prompt lookup, Jacobi) gives no q distributions: its q is a point mass on the drafted
token, for which the rule above still gives exactly p.

KV cache discipline: the target's cache holds every committed token but the last; a round runs the target once
over [last committed token, draft...] (gamma + 1 positions), then crops the cache back to the committed prefix
plus the accepted draft tokens (`commit_cache`).
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.events import Detail, DraftRound, Event
from explorer.params import param
from explorer.sampling import SamplingFilters
from explorer.strategies.acceptance import Acceptance, DraftTree, GreedyMatch, RejectionSampling, Verdict
from explorer.strategies.base import commit_token

RULES = ("greedy", "sampling")


class Drafter(ABC):
    """What the draft-verify engine needs from a drafter. Only `propose` is required; every other hook has a
    no-op default, and capabilities are declared as class attributes (override them, never probe for them).

    Once, before the first round, the engine calls bind(target session). Per round it calls: propose ->
    (one target pass) -> observe_logits (if `watches_logits`) -> observe(verdict) -> round_details ->
    drain_events."""

    name: str = "drafter"
    wants_hidden_states: bool = False  # the verification pass returns hidden states in Verdict.hidden_states
    watches_logits: bool = False  # observe_logits sees every target pass (the prefill too)
    wants_prefill_hidden_states: bool = False  # observe_prefill sees the prompt pass's hidden states

    def bind(self, target_session: Any) -> None:
        """See the target's KV session (drafters that draft on the target's own cache keep it). Between
        rounds it holds every committed token but the last; a drafter that writes to it crops it back."""
        return None  # a no-op by default

    @abstractmethod
    def propose(self, context: Sequence[int]) -> DraftTree:
        """The draft for the next positions after `context` (an empty tree: a plain step)."""

    def observe(self, verdict: Verdict) -> None:
        """Learn from the target's verdict on the last draft."""
        return None  # a no-op by default

    def observe_prefill(self, inputs: Sequence[int], logits: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """See the prompt pass (every prompt token but the last): logits `(len(inputs), vocab)`, hidden states
        `(layers + 1, len(inputs), hidden)`."""
        return None  # a no-op by default

    def observe_logits(self, inputs: Sequence[int], logits: torch.Tensor, parents: Sequence[int] | None) -> None:
        """See a target pass over `inputs` (`parents`: its tree, None for a chain): logits `(len(inputs),
        vocab)`."""
        return None  # a no-op by default

    def round_details(self) -> dict[str, Detail]:
        """Scalars recorded with the round that was just verified (e.g. the skipped layers)."""
        return {}

    def drain_events(self, round_index: int, piece: Callable[[int], str]) -> list[Event]:
        """Events about what the drafter learned this round (e.g. pool updates), handed over once."""
        return []


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

    def draft_distribution(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """A drafter's q over `logits` `(..., vocab)`: filtered as p is under the sampling rule, plain softmax
        under the greedy rule (where only its argmax matters)."""
        return torch.softmax(self.apply(logits, history) if self.rule == "sampling" else logits, dim=-1)

    def lossless_acceptance(self) -> Acceptance:
        """The exact rule that `rule` names: greedy match, or speculative (recursive rejection) sampling under
        these filters."""
        return RejectionSampling(self) if self.rule == "sampling" else GreedyMatch()


def choose_plain(logits: torch.Tensor, config: SpeculativeConfig, context: Sequence[int],
                 rng: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """One ordinary decoding step (no draft): argmax, or a draw from the filtered distribution."""
    if config.rule == "greedy":
        return int(torch.argmax(logits)), None
    kept = config.apply(logits, context)
    return int(torch.multinomial(torch.softmax(kept, dim=-1), 1, generator=rng)), kept


def draft_verify(model: Any, prompt_ids: Sequence[int], drafter: Drafter, config: SpeculativeConfig,
                 rng: torch.Generator, *, acceptance: Acceptance | None = None) -> Iterator[Event]:
    """Yield a DraftRound per verification and a TokenStep per committed token. Each draft is judged by
    `acceptance` (strategies/acceptance.py), chosen by the strategy; by default the config's exact rule
    (`SpeculativeConfig.lossless_acceptance`)."""
    acceptance = acceptance if acceptance is not None else config.lossless_acceptance()
    session = model.session()
    drafter.bind(session)
    context = list(prompt_ids)
    if len(context) > 1:  # the last prompt token goes in with the first draft
        hidden = drafter.wants_prefill_hidden_states
        out = session.forward(context[:-1], all_logits=drafter.watches_logits or hidden, hidden_states=hidden)
        prefill = out.logits
        if drafter.watches_logits:
            drafter.observe_logits(context[:-1], prefill, None)
        if hidden:
            drafter.observe_prefill(context[:-1], prefill, out.hidden)
    step = 0
    for round_index in itertools.count():
        t0 = time.perf_counter()
        draft = drafter.propose(context)  # 1. propose
        t1 = time.perf_counter()
        logits, hidden = target_pass(session, context[-1], draft, drafter)  # 2. verify: logits (nodes + 1, vocab)
        if not draft.tokens:  # nothing drafted: an ordinary step
            token, kept = choose_plain(logits[0], config, context, rng)
            yield commit_token(model, step, len(context), token, logits[0], kept)
            step += 1
            context.append(token)
            continue
        verdict = acceptance.verify(logits, draft, context, rng, hidden)  # 3. accept
        t2 = time.perf_counter()
        commit_cache(session, len(context), draft, verdict)  # 4. commit
        # what drafted this round (before it learns) and what the verifier decided
        details = {**draft.details, **drafter.round_details(), **verdict.details}
        drafter.observe(verdict)
        yield draft_round(model, round_index, context, drafter.name, config.rule, draft, verdict, details,
                          draft_time_s=t1 - t0, verify_time_s=t2 - t1)
        yield from drafter.drain_events(round_index, model.piece)
        rows = [0, *(node + 1 for node in verdict.path)]  # the logits row each committed token was drawn from
        accepted = [draft.tokens[node] for node in verdict.path]
        for i, token in enumerate([*accepted, verdict.bonus_token]):
            kept = None if config.rule == "greedy" else config.apply(logits[rows[i]], context)
            origin = "draft" if i < len(accepted) else "bonus"
            yield commit_token(model, step, len(context), token, logits[rows[i]], kept, origin=origin)
            step += 1
            context.append(token)


def target_pass(session: Any, last_token: int, draft: DraftTree, drafter: Drafter
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's one pass over [last committed token, draft...] (the tree under the last token): logits
    `(nodes + 1, vocab)` and, when the drafter wants them, hidden states `(layers + 1, nodes + 1, hidden)`."""
    wants_hidden = bool(draft.tokens) and drafter.wants_hidden_states
    parents = None if draft.is_chain else [-1] + [parent + 1 for parent in draft.parents]
    inputs = [last_token, *draft.tokens]
    out = session.forward(inputs, parents=parents, hidden_states=wants_hidden)
    logits, hidden = out.logits, out.hidden
    if drafter.watches_logits:
        drafter.observe_logits(inputs, logits, parents)
    return logits, hidden


def commit_cache(session: Any, committed: int, draft: DraftTree, verdict: Verdict) -> None:
    """Drop the rejected drafts' KV: keep the `committed` prefix (its last token included) and the accepted
    path's nodes."""
    if draft.is_chain:
        session.crop(committed + verdict.accepted_count)
    else:
        session.keep([*range(committed), *(committed + node for node in verdict.path)])


def draft_round(model: Any, round_index: int, context: Sequence[int], drafter_name: str, rule: str,
                draft: DraftTree, verdict: Verdict, details: dict[str, Detail], *, draft_time_s: float,
                verify_time_s: float) -> DraftRound:
    """The event of one round: every draft node with q, p, u and its verdict, and the bonus token."""
    return DraftRound(
        round=round_index, position=len(context), drafter=drafter_name, rule=rule,
        draft_tokens=list(draft.tokens), draft_texts=[model.piece(t) for t in draft.tokens],
        parents=list(draft.parents), q=list(verdict.q), p=list(verdict.p), u=list(verdict.u),
        verdicts=list(verdict.node_verdicts), accepted_count=verdict.accepted_count,
        bonus_token=verdict.bonus_token, bonus_text=model.piece(verdict.bonus_token), bonus_kind=verdict.bonus_kind,
        draft_time_s=draft_time_s, verify_time_s=verify_time_s, details=details,
    )


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
