"""SpecTr: speculative decoding with k i.i.d. drafts verified by optimal-transport selection (Sun, Suresh, Ro,
Beirami, Jain, Yu 2023, "SpecTr: Fast Speculative Decoding via Optimal Transport", arXiv:2310.15141).

Notation: p = target, q = draft, k = number of drafts, L = draft length (gamma), rho in [1, k] = K-SEQ's
acceptance slack, beta(rho) = sum_x min(q(x), p(x)/rho).
1. Draft: k i.i.d. sequences of L tokens from the draft model. They are drawn as a trie: the k draws at the root
   are grouped by token, and each distinct token with m draws gets m i.i.d. draws from q(. | its prefix) below
   it (the same distribution as k independent chains, with one draft pass per level instead of k).
2. Verify all of it in one tree-masked target pass.
3. Select with K-SEQ (the paper's (1 - 1/e)-optimal transport plan, Algorithm 2): at each depth the m draws that
   agree with the accepted prefix are tested in turn, draw x accepted with probability min(1, p(x)/(rho q(x)));
   if none is accepted the correction comes from the residual p_res (kseq_residual below). The output
   is distributed exactly as p (tested on a toy vocabulary). With k = 1, rho = 1: plain speculative sampling.
The comparison the paper is about, recorded every round on the same drafts: the chance that the root's k draws
yield an accepted token under K-SEQ (1 - (1 - beta)^k) and under recursive rejection sampling
(`rrs_root_acceptance`), and the number of tokens RRS would have accepted on this very draft (a shadow
verification with a generator of its own: the output is untouched). `selection = multiset` verifies with RRS
instead, for a side-by-side run.
Under the greedy rule the trie is verified by exact match (token-identical to greedy; k drafts then only widen
the tree). Departures: the paper's drafts come from a separate small model; offline the default drafter is the
target with its middle layers skipped (any same-vocabulary model id works). rho* is the root of
1 - (1 - beta(rho))^k = rho beta(rho) in [1, k] (the smallest valid rho, hence the largest acceptance), found by
bisection to ~1e-12 (kseq_rho; a test pins it against a closed form and a grid scan).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import param
from explorer.strategies.acceptance import (
    MULTISET,
    Acceptance,
    DraftTree,
    GreedyMatch,
    Judgement,
    NodeRule,
    Walk,
    accept_probability,
    residual,
)
from explorer.strategies.base import register, tree_prepare
from explorer.strategies.draft_models import DraftCache, load_draft_model, shares_weights
from explorer.strategies.draft_verify import Drafter, SpeculativeConfig, draft_verify
from explorer.trees import path_to

SELECTIONS = ("kseq", "multiset")


@dataclass(frozen=True)
class SpecTrConfig(SpeculativeConfig):
    drafts: int = param(4, "number of i.i.d. drafts k", minimum=1, maximum=16, step=1)
    draft_length: int = param(3, "tokens per draft L", minimum=1, maximum=8, step=1)
    selection: str = param("kseq", "sampling rule: kseq (SpecTr's optimal-transport selection) or multiset "
                                   "(recursive rejection sampling over the same draws)", choices=SELECTIONS)
    draft_model: str = param("layer-skip", "drafter: 'layer-skip' (the target minus its middle quarter of layers), "
                             "'target', or an HF id / local path of a model with the target's vocabulary",
                             model=True)

    def draft_nodes(self) -> int:
        return self.drafts * self.draft_length


# ------------------------------------------------------------------------------------------- K-SEQ
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


@dataclass
class TrieSelection(NodeRule):
    """Judges the trie of k i.i.d. draft chains (a multiset draft: node i stands for `multiplicity[i]` draws of
    its token from q at its parent) under the sampling rule. At each node the m draws below it are tested one by
    one in a uniformly random order (the order of i.i.d. draws; grouping equal tokens would bias the result):
    - selection "kseq" (K-SEQ, the paper's Algorithm 2): draw x is accepted with probability
      min(1, p(x) / (rho q(x))), rho = kseq_rho(p, q, m); if all m are rejected the token is drawn from
      kseq_residual(p, q, rho, m);
    - selection "multiset" (recursive rejection sampling over the same draws): min(1, p(x) / q(x)), and after
      each rejection p <- residual(p, q).
    After an acceptance of token x the chains that drew x go on: their next tokens are i.i.d. from q(. | x), so
    the walk repeats with m = multiplicity of x. Both give exactly p."""

    filters: SpeculativeConfig
    selection: str = "kseq"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.selection

    def judge(self, row: torch.Tensor, kids: list[int], draft: DraftTree, history: list[int],
              rng: torch.Generator, walk: Walk) -> Judgement:
        p = torch.softmax(self.filters.apply(row, history), dim=-1)
        if not kids:
            return Judgement(token=int(torch.multinomial(p, 1, generator=rng)))
        q = draft.q_dists[kids[0]]  # every draw under one node comes from the same q
        draws = [kid for kid in kids for _ in range(draft.multiplicity[kid])]
        order = torch.randperm(len(draws), generator=rng, device=rng.device).tolist()
        kseq = self.selection == "kseq"
        rho = kseq_rho(p, q, len(draws)) if kseq else 1.0
        chances = kseq_accept(p, q, rho)  # (vocab,): recomputed only when p changes (RRS)
        for index in order:
            kid = draws[index]
            token = draft.tokens[kid]
            u = float(torch.rand((), generator=rng, device=rng.device))
            if walk.p[kid] is None:
                walk.p[kid], walk.q[kid], walk.u[kid] = float(p[token]), float(q[token]), u
            if u < float(chances[token]):
                for other in kids:
                    walk.verdicts[other] = "accepted" if other == kid else "rejected"
                return Judgement(child=kid)
            walk.verdicts[kid] = "rejected"
            if not kseq:
                p = residual(p, q)
                chances = kseq_accept(p, q, rho)
        left = kseq_residual(p, q, rho, len(draws)) if kseq else p
        return Judgement(token=int(torch.multinomial(left, 1, generator=rng)))


def group_draws(draws: Sequence[int]) -> list[tuple[int, int]]:
    """i.i.d. draws -> (token, count) in order of first appearance."""
    counts: dict[int, int] = {}
    for token in draws:
        counts[int(token)] = counts.get(int(token), 0) + 1
    return list(counts.items())


class SpecTrDrafter(Drafter):
    """Draws the trie of k i.i.d. chains, one draft pass per level, on the draft's cache; computes the K-SEQ vs
    RRS comparison from the verification pass."""

    watches_logits = True

    def __init__(self, lm: Any, config: SpecTrConfig, rng: torch.Generator, name: str, *, shared: bool):
        self.lm, self.config, self.rng, self.name = lm, config, rng, name
        self.cache = DraftCache(lm, shared)
        seed = int(torch.randint(0, 2**62, (), generator=rng))
        self.shadow_rng = torch.Generator(device=rng.device).manual_seed(seed)  # RRS's shadow draws
        self._draft = DraftTree()
        self._context: list[int] = []
        self._details: dict[str, float | str] = {}

    def bind(self, target_session: Any) -> None:
        self.cache.bind(target_session)

    def propose(self, context: Sequence[int]) -> DraftTree:
        base, passes = len(context), self.lm.forward_passes
        tokens: list[int] = []
        parents: list[int] = []
        counts: list[int] = []
        rows: list[torch.Tensor] = []
        q_of = self.config.draft_distribution
        frontier = [(-1, q_of(self.cache.start(context), context), self.config.drafts)]  # (node, q, draws)
        for level in range(self.config.draft_length):
            new: list[int] = []
            for node, q, m in frontier:
                for token, count in group_draws(torch.multinomial(q, m, replacement=True, generator=self.rng).tolist()):
                    tokens.append(token)
                    parents.append(node)
                    counts.append(count)
                    rows.append(q)
                    new.append(len(tokens) - 1)
            if level + 1 == self.config.draft_length:
                break
            logits = self.cache.session.forward([tokens[i] for i in new], parents=parents, tree_base=base).logits
            frontier = [(node, q_of(logits[j], [*context, *(tokens[i] for i in path_to(parents, node))]),
                         counts[node]) for j, node in enumerate(new)]
        self.cache.finish()
        draft = DraftTree(tokens, parents, [float(rows[i][t]) for i, t in enumerate(tokens)], torch.stack(rows),
                          mode=MULTISET, multiplicity=counts)
        draft.details.update(nodes=float(len(tokens)), drafts=float(self.config.drafts),
                             draft_forward_passes=float(self.lm.forward_passes - passes))
        self._draft, self._context = draft, list(context)
        return draft

    def observe_logits(self, inputs: Sequence[int], logits: torch.Tensor, parents: Sequence[int] | None) -> None:
        """The comparison on this round's drafts: both rules' chance of accepting at the root, and what RRS
        would have accepted (sampling rule only; a prefill or a plain step has no drafts)."""
        draft = self._draft
        self._details = {}
        if self.config.rule != "sampling" or not draft.tokens or len(inputs) != len(draft.tokens) + 1:
            return
        p = torch.softmax(self.config.apply(logits[0], self._context), dim=-1)
        q = draft.q_dists[0]
        k = self.config.drafts
        rho = kseq_rho(p, q, k)
        beta = kseq_beta(p, q, rho)
        rrs = TrieSelection(self.config, "multiset").verify(logits, draft, self._context, self.shadow_rng)
        self._details = {"kseq_root_accept": 1.0 - (1.0 - beta) ** k, "rrs_root_accept": rrs_root_acceptance(p, q, k),
                         "rho": rho, "rrs_accepted": float(rrs.accepted_count)}

    def round_details(self) -> dict[str, float | str]:
        return dict(self._details)


def spectr_acceptance(config: SpecTrConfig) -> Acceptance:
    """The rule for SpecTr's drafts: K-SEQ (or RRS over the same draws, `selection`) under the sampling rule,
    exact match under the greedy rule."""
    return TrieSelection(config, config.selection) if config.rule == "sampling" else GreedyMatch()


def spectr_drafter(model: Any, config: SpecTrConfig, rng: torch.Generator) -> SpecTrDrafter:
    draft = load_draft_model(model, config.draft_model)
    return SpecTrDrafter(draft, config, rng, f"SpecTr k={config.drafts} from {draft.info.model_id}",
                         shared=shares_weights(model, draft))


def prepare(model: Any, config: SpecTrConfig) -> None:
    tree_prepare(model, config)
    load_draft_model(model, config.draft_model)


@register("spectr", SpecTrConfig, "SpecTr: k i.i.d. drafts, verified by optimal-transport (K-SEQ) selection",
          prepare=prepare, family="speed-up: draft-verify",
          paper="Sun et al. 2023, SpecTr, arXiv:2310.15141",
          reference_code="none public (the paper's Algorithm 2, K-SEQ)",
          departures=(
              "the default drafter is the target with its middle quarter of layers skipped, not a separate small "
              "model (draft_model names one with the target's vocabulary)",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: SpecTrConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, spectr_drafter(model, config, rng), config, rng,
                            acceptance=spectr_acceptance(config))
