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
Drafters subclass `Drafter`: `propose(context) -> DraftTree` is required, the other hooks have no-op defaults.
A deterministic drafter (prompt lookup, Jacobi) gives no q distributions: its q is a point mass on the drafted
token, for which the rule above still gives exactly p.

KV cache discipline: the target's cache holds every committed token but the last; a round runs the target once
over [last committed token, draft...] (gamma + 1 positions), then crops the cache back to the committed prefix
plus the accepted draft tokens (`commit_cache`).
"""

from __future__ import annotations

import itertools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.events import Detail, DraftRound, Event
from explorer.params import param
from explorer.sampling import SamplingFilters
from explorer.strategies.base import commit_token
from explorer.trees import children, path_to

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


def kseq_beta(p: torch.Tensor, q: torch.Tensor, rho: float) -> float:
    """SpecTr's beta_{p,q}(rho) = sum_x min(q(x), p(x) / rho): the chance that one draw is accepted."""
    return float(torch.minimum(q, p / rho).sum())


def kseq_rho(p: torch.Tensor, q: torch.Tensor, k: int) -> float:
    """The smallest rho in [1, k] with rho * beta(rho) >= 1 - (1 - beta(rho))^k (Sun et al. 2023, K-SEQ): the
    largest acceptance for which the residual below stays a distribution. rho * beta grows and 1 - (1 - beta)^k
    falls with rho, so a bisection finds it; k = 1 gives rho = 1 (plain speculative sampling)."""
    if k <= 1:
        return 1.0
    low, high = 1.0, float(k)
    for _ in range(40):
        mid = 0.5 * (low + high)
        beta = kseq_beta(p, q, mid)
        if mid * beta >= 1.0 - (1.0 - beta) ** k:
            high = mid
        else:
            low = mid
    return high


def kseq_accept(p: torch.Tensor, q: torch.Tensor, rho: float) -> torch.Tensor:
    """K-SEQ's acceptance probability of a draw x: min(1, p(x) / (rho q(x)))."""
    return accept_probability(p / rho, q)


def kseq_residual(p: torch.Tensor, q: torch.Tensor, rho: float, k: int) -> torch.Tensor:
    """Where K-SEQ draws when all k draws are rejected: p_res = (p - min(q, p / rho) (1 - (1 - beta)^k) / beta)
    / (1 - beta)^k, so that acceptance and residual together give exactly p."""
    beta = kseq_beta(p, q, rho)
    rejected_all = (1.0 - beta) ** k
    if rejected_all < 1e-12 or beta <= 0:
        return p
    mass = torch.clamp(p - torch.minimum(q, p / rho) * (1.0 - rejected_all) / beta, min=0.0)
    return mass / mass.sum() if mass.sum() > 0 else p


def rrs_root_acceptance(p: torch.Tensor, q: torch.Tensor, k: int) -> float:
    """Recursive rejection sampling's chance of accepting one of k i.i.d. draws from q: draw i is accepted with
    probability sum_x min(q, p_{i-1}), p_i = residual(p_{i-1}, q) (deterministic, whatever was drawn)."""
    none = 1.0
    for _ in range(k):
        none *= 1.0 - float(torch.minimum(q, p).sum())
        p = residual(p, q)
    return 1.0 - none


# ------------------------------------------------------------------------------------------ the draft
@dataclass
class DraftTree:
    """Draft tokens with one parent index each (-1: the committed prefix). `draft_probs` holds the draft's
    probability q of each token; `q_dists` the full q rows `(n, vocab)`, or None for deterministic drafters
    (point masses)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    draft_probs: list[float] = field(default_factory=list)
    q_dists: torch.Tensor | None = None
    details: dict[str, Detail] = field(default_factory=dict)
    # how siblings were drawn from q: iid, without_replacement, point (deterministic), or a multiset of i.i.d.
    # draws with `multiplicity[i]` draws of node i (the trie of k i.i.d. chains), verified by SpecTr's K-SEQ
    # ("kseq") or by recursive rejection sampling over the same draws ("multiset")
    mode: str = "iid"
    multiplicity: list[int] = field(default_factory=list)

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


# --------------------------------------------------------------------------------------- verification
def verify_tree(logits: torch.Tensor, draft: DraftTree, rule: str, filters: SamplingFilters,
                context: Sequence[int], rng: torch.Generator, hidden_states: torch.Tensor | None = None) -> Verdict:
    """Verify a draft tree against target logits `(nodes + 1, vocab)`: row 0 predicts the root's children, row
    i + 1 the children of node i. Walks down from the root, accepting at most one child per node.

    Greedy rule: follow the child equal to the target's argmax. Sampling rule (multi-draft recursive rejection
    sampling; SpecInfer, Miao et al. 2024, arXiv:2305.09781; Recursive Speculative Decoding, Jeon et al. 2024,
    arXiv:2402.14160): try the children in order; child x is accepted with probability min(1, p(x) / q(x));
    after a rejection p <- norm(max(0, p - q)), and for children drawn without replacement q also loses x
    (renormalised). If every child is rejected the correction is drawn from what is left of p. Deterministic
    children (mode point) have q = a point mass, so the output is distributed exactly as p in every mode.
    `hidden_states` of the same pass are handed on in the Verdict. Multiset drafts (modes kseq, multiset) under
    the sampling rule go to `verify_multiset`."""
    if rule == "sampling" and draft.mode in MULTISET_MODES:
        return verify_multiset(logits, draft, filters, context, rng, hidden_states)
    n = len(draft.tokens)
    kids_of = children(draft.parents)
    argmax = logits.argmax(dim=-1).tolist()
    p_list: list[float | None] = [None] * n
    u_list: list[float | None] = [None] * n
    q_list = [float(x) for x in draft.draft_probs]
    verdicts = ["unreached"] * n
    path: list[int] = []
    history = list(context)
    current = -1
    while True:
        row = logits[current + 1]
        kids = kids_of.get(current, [])
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
    kind = "bonus" if not kids_of.get(current) else "correction"
    return Verdict(len(path), bonus, kind, p_list, q_list, u_list, verdicts, argmax, hidden_states, path)


MULTISET_MODES = ("kseq", "multiset")


def verify_multiset(logits: torch.Tensor, draft: DraftTree, filters: SamplingFilters, context: Sequence[int],
                    rng: torch.Generator, hidden_states: torch.Tensor | None = None) -> Verdict:
    """Verify the trie of k i.i.d. draft chains (node i stands for `multiplicity[i]` draws of its token from q
    at its parent) under the sampling rule. At each node the m draws below it are tested one by one in a
    uniformly random order (the order of i.i.d. draws; grouping equal tokens would bias the result):
    - mode "kseq" (SpecTr's K-SEQ, Sun et al. 2023, arXiv:2310.15141, Algorithm 2): draw x is accepted with
      probability min(1, p(x) / (rho q(x))), rho = kseq_rho(p, q, m); if all m are rejected the token is drawn
      from kseq_residual(p, q, rho, m);
    - mode "multiset" (recursive rejection sampling over the same draws): min(1, p(x) / q(x)), and after each
      rejection p <- residual(p, q).
    After an acceptance of token x the chains that drew x go on: their next tokens are i.i.d. from q(. | x), so
    the walk repeats with m = multiplicity of x. Both give exactly p."""
    n = len(draft.tokens)
    kids_of = children(draft.parents)
    p_list: list[float | None] = [None] * n
    u_list: list[float | None] = [None] * n
    q_list = [float(x) for x in draft.draft_probs]
    verdicts = ["unreached"] * n
    path: list[int] = []
    history = list(context)
    current = -1
    while True:
        p = torch.softmax(filters.apply(logits[current + 1], history), dim=-1)
        kids = kids_of.get(current, [])
        if not kids:
            bonus = int(torch.multinomial(p, 1, generator=rng))
            break
        q = draft.q_dists[kids[0]]  # every draw under one node comes from the same q
        draws = [kid for kid in kids for _ in range(draft.multiplicity[kid])]
        order = torch.randperm(len(draws), generator=rng, device=rng.device).tolist()
        rho = kseq_rho(p, q, len(draws)) if draft.mode == "kseq" else 1.0
        chances = kseq_accept(p, q, rho)  # (vocab,): recomputed only when p changes (RRS)
        accepted = None
        for index in order:
            kid = draws[index]
            token = draft.tokens[kid]
            chance = float(chances[token])
            u = float(torch.rand((), generator=rng, device=rng.device))
            if p_list[kid] is None:
                p_list[kid], q_list[kid], u_list[kid] = float(p[token]), float(q[token]), u
            if u < chance:
                accepted = kid
                break
            verdicts[kid] = "rejected"
            if draft.mode == "multiset":
                p = residual(p, q)
                chances = kseq_accept(p, q, rho)
        if accepted is None:
            left = kseq_residual(p, q, rho, len(draws)) if draft.mode == "kseq" else p
            bonus = int(torch.multinomial(left, 1, generator=rng))
            break
        for kid in kids:
            verdicts[kid] = "accepted" if kid == accepted else "rejected"
        path.append(accepted)
        history.append(draft.tokens[accepted])
        current = accepted
    kind = "bonus" if not kids_of.get(current) else "correction"
    return Verdict(len(path), bonus, kind, p_list, q_list, u_list, verdicts, logits.argmax(dim=-1).tolist(),
                   hidden_states, path)


def verify_rollback(logits: torch.Tensor, draft: DraftTree, alpha: float, rule: str, filters: SamplingFilters,
                    context: Sequence[int], rng: torch.Generator) -> Verdict:
    """BiLD's rollback policy (Kim et al. 2023, arXiv:2302.07863, Sec. 3.3), lossy by design, on a chain:
    the large model's logits `(n + 1, vocab)` over the small model's n tokens; roll back at the first token x_i
    whose distance d = -ln p_i(x_i) (cross-entropy of the small model's token under the large model) exceeds
    alpha_RB, and put the large model's own token there instead; with no rollback, the large model's token
    after the last one follows. The large model's token is its argmax (greedy rule) or a draw from its filtered
    p (sampling rule). With alpha_RB < ln 2 every kept token has p > 1/2, so the greedy rule stays exact."""
    if not draft.is_chain:
        raise ValueError("the rollback policy verifies chains only")
    n = len(draft.tokens)
    logp = torch.log_softmax(logits, dim=-1)
    p_list: list[float | None] = [None] * n
    verdicts = ["unreached"] * n
    history = list(context)
    accepted = n
    for i, token in enumerate(draft.tokens):
        p_list[i] = float(logp[i, token].exp())
        if -float(logp[i, token]) > alpha:
            verdicts[i], accepted = "rejected", i
            break
        verdicts[i] = "accepted"
        history.append(token)
    if rule == "greedy":
        bonus = int(logits[accepted].argmax())
    else:
        bonus = int(torch.multinomial(torch.softmax(filters.apply(logits[accepted], history), dim=-1), 1,
                                      generator=rng))
    kind = "bonus" if accepted == n else "correction"
    return Verdict(accepted, bonus, kind, p_list, [float(x) for x in draft.draft_probs], [None] * n, verdicts,
                   logits.argmax(dim=-1).tolist())


@dataclass(frozen=True)
class TypicalAcceptance:
    """Medusa's typical acceptance (Cai et al. 2024, arXiv:2401.10774, Sec. 2.3.1): a hard threshold epsilon
    (`posterior_threshold`) and an entropy-scaled one delta (`posterior_alpha`)."""

    posterior_threshold: float
    posterior_alpha: float


def typical_threshold(p: torch.Tensor, posterior_threshold: float, posterior_alpha: float) -> float:
    """The bar a drafted token's p must clear: min(epsilon, delta * exp(-H(p))), H in nats (0 log 0 = 0; the
    authors' code takes log(p + 1e-5), a guard that shifts H by at most ~1e-5 per vocabulary entry)."""
    logp = torch.log(p.clamp_min(1e-300))
    entropy = float(-(p * logp).sum())
    return min(posterior_threshold, posterior_alpha * math.exp(-entropy))


def verify_typical(logits: torch.Tensor, draft: DraftTree, typical: TypicalAcceptance, filters: SamplingFilters,
                   context: Sequence[int], hidden_states: torch.Tensor | None = None) -> Verdict:
    """Medusa's typical acceptance on a tree, LOSSY (the output is not distributed as p): node i, whose token
    follows its parent's position, passes if p(x_i) > typical_threshold(p) there, p = the filtered softmax at
    that position (the authors: softmax(logits / T)); a path is accepted up to its first failing node. Among
    all root-to-node paths the longest accepted one wins, ties broken by the higher sum of log p over it
    (`evaluate_posterior`), exact ties by the first node; the token after it is the target's argmax (the
    paper takes the first token greedily so that every round makes progress). No uniform draw is used (u is
    None); the threshold of every reached node is recorded in `details["typical_threshold"]` (comma-separated,
    empty where unreached)."""
    n = len(draft.tokens)
    kids_of = children(draft.parents)
    p_list: list[float | None] = [None] * n
    thresholds: list[float | None] = [None] * n
    verdicts = ["unreached"] * n
    # walk down from the root through passing nodes only; rank each passing node's path by (length, sum of
    # log p, earlier node): the authors' longest accepted candidate, then the most likely
    best, best_key = -1, (0, 0.0, 1)
    stack: list[tuple[int, list[int], int, float]] = [(-1, [], 0, 0.0)]  # (node, its path's tokens, depth, log p)
    while stack:
        node, tokens, depth, loglik = stack.pop()
        kids = kids_of.get(node, [])
        if not kids:
            continue
        p = torch.softmax(filters.apply(logits[node + 1], [*context, *tokens]), dim=-1)  # (vocab,)
        bar = typical_threshold(p, typical.posterior_threshold, typical.posterior_alpha)
        for kid in kids:
            token = draft.tokens[kid]
            p_list[kid], thresholds[kid] = float(p[token]), bar
            if float(p[token]) <= bar:
                verdicts[kid] = "rejected"
                continue
            verdicts[kid] = "passed"
            key = (depth + 1, loglik + float(torch.log(p[token])), -kid)
            if key > best_key:
                best, best_key = kid, key
            stack.append((kid, [*tokens, token], depth + 1, key[1]))
    path = path_to(draft.parents, best)
    on_path = set(path)
    verdicts = ["accepted" if i in on_path else "rejected" if v == "passed" else v for i, v in enumerate(verdicts)]
    bonus = int(logits[best + 1].argmax())
    kind = "bonus" if not kids_of.get(best) else "correction"
    details: dict[str, Detail] = {
        "acceptance": "typical",
        "typical_threshold": ",".join("" if t is None else f"{t:.6g}" for t in thresholds)}
    return Verdict(len(path), bonus, kind, p_list, [float(x) for x in draft.draft_probs], [None] * n, verdicts,
                   logits.argmax(dim=-1).tolist(), hidden_states, path, details)


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

    def draft_distribution(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """A drafter's q over `logits` `(..., vocab)`: filtered as p is under the sampling rule, plain softmax
        under the greedy rule (where only its argmax matters)."""
        return torch.softmax(self.apply(logits, history) if self.rule == "sampling" else logits, dim=-1)


def choose_plain(logits: torch.Tensor, config: SpeculativeConfig, context: Sequence[int],
                 rng: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """One ordinary decoding step (no draft): argmax, or a draw from the filtered distribution."""
    if config.rule == "greedy":
        return int(torch.argmax(logits)), None
    kept = config.apply(logits, context)
    return int(torch.multinomial(torch.softmax(kept, dim=-1), 1, generator=rng)), kept


def draft_verify(model: Any, prompt_ids: Sequence[int], drafter: Drafter, config: SpeculativeConfig,
                 rng: torch.Generator, *, rollback: float = 0.0,
                 typical: TypicalAcceptance | None = None) -> Iterator[Event]:
    """Yield a DraftRound per verification and a TokenStep per committed token. With `rollback` > 0 drafts are
    verified by BiLD's lossy rollback policy (`verify_rollback`) instead of the exact rules; with `typical`
    (under the sampling rule) by Medusa's lossy typical acceptance (`verify_typical`)."""
    session = model.session()
    drafter.bind(session)
    context = list(prompt_ids)
    if len(context) > 1:  # the last prompt token goes in with the first draft
        hidden = drafter.wants_prefill_hidden_states
        out = session.forward(context[:-1], all_logits=drafter.watches_logits or hidden, hidden_states=hidden)
        prefill = out[0] if hidden else out
        if drafter.watches_logits:
            drafter.observe_logits(context[:-1], prefill, None)
        if hidden:
            drafter.observe_prefill(context[:-1], prefill, out[1])
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
        if rollback:
            verdict = verify_rollback(logits, draft, rollback, config.rule, config, context, rng)  # 3. accept
        elif typical is not None and config.rule == "sampling":
            verdict = verify_typical(logits, draft, typical, config, context, hidden)  # 3. accept
        else:
            verdict = verify_tree(logits, draft, config.rule, config, context, rng, hidden)  # 3. accept
        t2 = time.perf_counter()
        commit_cache(session, len(context), draft, verdict)  # 4. commit
        # what drafted this round (before it learns) and what the verifier decided
        details = {**draft.details, **drafter.round_details(), **verdict.details}
        if rollback:
            details["rolled_back"] = float(len(draft.tokens) - verdict.accepted_count)
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
    logits, hidden = out if wants_hidden else (out, None)
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
