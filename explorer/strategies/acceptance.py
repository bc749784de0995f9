"""Acceptance rules: how one verification pass of the target judges a draft, kept apart from drafting (as vLLM
keeps its rejection sampler apart from its proposers: `vllm/v1/sample/rejection_sampler.py`).

A rule is an `Acceptance`: `verify(logits, draft, context, rng, hidden_states) -> Verdict`, logits
`(nodes + 1, vocab)` from the target's one pass over [last committed token, draft...] (row 0 predicts the root's
children, row i + 1 the children of node i). The strategy chooses its rule and hands it to the engine
(`draft_verify(..., acceptance=)`); without one the engine takes its config's (`SpeculativeConfig.acceptance`:
`GreedyMatch` or `RejectionSampling` by the `rule` field).

Most rules judge one node at a time on the way down from the root: they subclass `NodeRule` and implement
`judge` (which child of this node, if any, is accepted, and otherwise which token ends the round), and the one
walk in `NodeRule.verify` keeps the bookkeeping (p, q, u and a verdict per node, the accepted path, the bonus).
The rules and where they live:
- `GreedyMatch` (here): follow the child equal to the target's argmax; token-identical to greedy decoding.
- `RejectionSampling` (here): speculative sampling (Leviathan et al. 2023, arXiv:2211.17192, Algorithm 1) and,
  on a tree, multi-draft recursive rejection sampling (SpecInfer, Miao et al. 2024, arXiv:2305.09781; Jeon et al.
  2024, arXiv:2402.14160). Lossless.
- `TrieSelection` (strategies/spectr.py): SpecTr's K-SEQ or RRS over a multiset of i.i.d. draws. Lossless.
- `Rollback` (strategies/speculative.py): BiLD's rollback policy. Lossy.
- `TypicalAcceptance` (strategies/medusa.py): Medusa's typical acceptance, which searches every path rather than
  walking one (it implements `verify` itself). Lossy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from explorer.events import Detail
from explorer.sampling import SamplingFilters
from explorer.trees import children

# how a draft's siblings were drawn from q (`DraftTree.mode`)
IID, WITHOUT_REPLACEMENT, POINT, MULTISET = "iid", "without_replacement", "point", "multiset"
MODES = (IID, WITHOUT_REPLACEMENT, POINT, MULTISET)


# ------------------------------------------------------------------------------------------- the math
def accept_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """min(1, p / q) elementwise (1 where q = 0: such tokens are never drafted)."""
    return torch.where(q > 0, torch.clamp(p / q.clamp_min(1e-30), max=1.0), torch.ones_like(p))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to sample the correction after a rejection (p itself if p <= q everywhere)."""
    excess = torch.clamp(p - q, min=0.0)
    total = excess.sum()
    return excess / total if total > 0 else p


def point_mass(token: int, like: torch.Tensor) -> torch.Tensor:
    """q of a deterministic draft: all its mass on the drafted token."""
    mass = torch.zeros_like(like)
    mass[token] = 1.0
    return mass


# ------------------------------------------------------------------------------------------ the draft
@dataclass
class DraftTree:
    """Draft tokens with one parent index each (-1: the committed prefix). `draft_probs` holds the draft's
    probability q of each token; `q_dists` the full q rows `(n, vocab)`, or None for deterministic drafters
    (point masses). `mode` says how siblings were drawn from q: iid, without_replacement, point
    (deterministic), or multiset (the trie of k i.i.d. chains: node i stands for `multiplicity[i]` draws of its
    token). The mode describes the draft; the strategy's `Acceptance` decides how it is judged."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    draft_probs: list[float] = field(default_factory=list)
    q_dists: torch.Tensor | None = None
    details: dict[str, Detail] = field(default_factory=dict)
    mode: str = IID
    multiplicity: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"draft mode {self.mode!r}: one of {', '.join(MODES)}")

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    @classmethod
    def chain(cls, tokens: Sequence[int], draft_probs: Sequence[float] | None = None,
              q_dists: torch.Tensor | None = None, **details: float) -> DraftTree:
        tokens = list(tokens)
        return cls(tokens, list(range(-1, len(tokens) - 1)), list(draft_probs or [1.0] * len(tokens)), q_dists,
                   dict(details))


@dataclass(frozen=True)
class Verdict:
    """What the target said about one draft: per node p, q, u and an accepted / rejected / unreached verdict,
    the accepted path (node indices, root to leaf), and the bonus token that follows it."""

    accepted_count: int
    bonus_token: int
    bonus_kind: str  # "correction" after a rejection, "bonus" after full acceptance
    p: list[float | None]
    q: list[float]
    u: list[float | None]
    node_verdicts: list[str]
    target_argmax: list[int]  # the target's argmax at every verified position (Jacobi's next guesses)
    hidden_states: torch.Tensor | None = None  # (layers + 1, nodes + 1, hidden) for drafters that want them
    path: list[int] = field(default_factory=list)  # accepted draft nodes, root to leaf
    details: dict[str, Detail] = field(default_factory=dict)  # what the verifier decided, for the round

    def __post_init__(self) -> None:
        if not self.path:
            object.__setattr__(self, "path", list(range(self.accepted_count)))


# ------------------------------------------------------------------------------------------ the rules
class Acceptance(ABC):
    """How a draft is judged. `lossless`: the committed tokens are distributed exactly as the target's
    (filtered) p, or equal greedy decoding's under the greedy rule."""

    name: str = "acceptance"
    lossless: bool = True

    @abstractmethod
    def verify(self, logits: torch.Tensor, draft: DraftTree, context: Sequence[int], rng: torch.Generator,
               hidden_states: torch.Tensor | None = None) -> Verdict:
        """Judge `draft` after `context` from the target's logits `(nodes + 1, vocab)`; `hidden_states` of the
        same pass are handed on in the Verdict."""

    def details(self, draft: DraftTree, walk: Walk) -> dict[str, Detail]:
        """What this rule records with the round beyond the per-node p, q, u and verdicts."""
        return {}


@dataclass
class Walk:
    """The bookkeeping of one verification: per node p, q, u and verdict (a rule writes what it decided)."""

    p: list[float | None]
    q: list[float]
    u: list[float | None]
    verdicts: list[str]
    path: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, draft: DraftTree) -> Walk:
        n = len(draft.tokens)
        return cls([None] * n, [float(x) for x in draft.draft_probs], [None] * n, ["unreached"] * n)


@dataclass(frozen=True)
class Judgement:
    """A rule's decision at one node: the accepted child (walk on) or, with `child` None, the token that ends
    the round (a correction after rejections, a bonus at a leaf)."""

    child: int | None = None
    token: int | None = None


class NodeRule(Acceptance):
    """A rule that judges one node at a time, walking down from the root: at each node at most one child is
    accepted; the round ends at the first node where none is (or at a leaf)."""

    @abstractmethod
    def judge(self, row: torch.Tensor, kids: list[int], draft: DraftTree, history: list[int],
              rng: torch.Generator, walk: Walk) -> Judgement:
        """At the node whose children are `kids` (possibly none), with `row` the target's logits there and
        `history` the context plus the accepted path: accept a child or end the round with a token."""

    def verify(self, logits: torch.Tensor, draft: DraftTree, context: Sequence[int], rng: torch.Generator,
               hidden_states: torch.Tensor | None = None) -> Verdict:
        kids_of = children(draft.parents)
        walk = Walk.of(draft)
        history = list(context)
        current = -1
        while True:
            judgement = self.judge(logits[current + 1], kids_of.get(current, []), draft, history, rng, walk)
            if judgement.child is None:
                break
            walk.path.append(judgement.child)
            history.append(draft.tokens[judgement.child])
            current = judgement.child
        kind = "bonus" if not kids_of.get(current) else "correction"
        return Verdict(len(walk.path), int(judgement.token), kind, walk.p, walk.q, walk.u, walk.verdicts,
                       logits.argmax(dim=-1).tolist(), hidden_states, walk.path, self.details(draft, walk))


class GreedyMatch(NodeRule):
    """The greedy rule: accept the child equal to the target's argmax; where none is, the argmax ends the round
    (so the output is token-identical to greedy decoding). p is recorded from the plain softmax."""

    name = "greedy"

    def judge(self, row: torch.Tensor, kids: list[int], draft: DraftTree, history: list[int],
              rng: torch.Generator, walk: Walk) -> Judgement:
        probs = torch.softmax(row, dim=-1)
        best = int(row.argmax())
        for kid in kids:
            walk.p[kid] = float(probs[draft.tokens[kid]])
        match = next((k for k in kids if draft.tokens[k] == best), None)
        for kid in kids:
            walk.verdicts[kid] = "accepted" if kid == match else "rejected"
        return Judgement(child=match) if match is not None else Judgement(token=best)


@dataclass
class RejectionSampling(NodeRule):
    """The sampling rule (Leviathan et al. 2023, Algorithm 1; on trees SpecInfer's multi-draft recursive
    rejection sampling). Notation: p = the target's filtered distribution at the node, q = the draft's,
    u ~ U(0, 1). The children are tried in order; child x is accepted if u < min(1, p(x) / q(x)); after a
    rejection p <- norm(max(0, p - q)), and for children drawn without replacement q also loses x
    (renormalised). If every child is rejected the correction is drawn from what is left of p; at a leaf the
    bonus from p. Deterministic children (mode point, or no q rows) have q = a point mass, so the output is
    distributed exactly as p in every mode. A multiset draft is judged by `TrieSelection` (spectr.py)."""

    filters: SamplingFilters
    name = "sampling"

    def judge(self, row: torch.Tensor, kids: list[int], draft: DraftTree, history: list[int],
              rng: torch.Generator, walk: Walk) -> Judgement:
        if draft.mode == MULTISET:
            raise ValueError("a multiset draft (k i.i.d. chains) is judged by SpecTr's TrieSelection")
        p = torch.softmax(self.filters.apply(row, history), dim=-1)
        q = None if draft.q_dists is None or draft.mode == POINT or not kids else draft.q_dists[kids[0]].clone()
        for kid in kids:
            token = draft.tokens[kid]
            q_kid = q if q is not None else point_mass(token, p)
            walk.p[kid], walk.q[kid] = float(p[token]), float(q_kid[token])
            u = float(torch.rand((), generator=rng, device=rng.device))
            walk.u[kid] = u
            if u < float(accept_probability(p[token], q_kid[token])):
                walk.verdicts[kid] = "accepted"
                return Judgement(child=kid)
            walk.verdicts[kid] = "rejected"
            p = residual(p, q_kid)
            if q is not None and draft.mode == WITHOUT_REPLACEMENT:
                q[token] = 0.0
                q = q / q.sum() if q.sum() > 0 else q
        return Judgement(token=int(torch.multinomial(p, 1, generator=rng)))
