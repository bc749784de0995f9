"""Medusa: draft heads on the target's last hidden state, a tree of their top-k combinations (Cai, Li, Geng, Peng,
Lee, Chen, Dao 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
arXiv:2401.10774); the heads are explorer.heads.MedusaHeads (Medusa-1: frozen target).

Notation: h_t = the target's normed last hidden state after x_t (its LM head predicts x_(t+1) from it); head k
(k = 1..K) predicts x_(t+1+k) from the same h_t; s_k = the top-s_k tokens of head k (`widths`).
Each round, with h the feature of the last position the target processed (its LM head already gave the last
committed token):
1. Head k's top-s_k tokens are the candidates at depth k of the tree; every node at depth k - 1 gets all of
   them as children (the heads guess each position independently: the tree is the Cartesian product, pruned by
   the widths, as Medusa's sparse trees are).
2. The target verifies the tree in one tree-masked pass; the accepted path and the bonus token are committed,
   and the hidden state of the last accepted position is the next h. The acceptance (`acceptance`):
   - exact (default, lossless): the greedy rule, or under the sampling rule speculative sampling with the
     candidates as point masses (a sibling x accepted with probability p(x), p the residual left by the siblings
     rejected before it): the output is distributed as p;
   - typical (Sec. 2.3.1, the paper's choice for sampling; LOSSY): x passes if p(x) > min(epsilon, delta *
     exp(-H(p))) (epsilon = `posterior_threshold`, delta = `posterior_alpha`, the authors' 0.09 and 0.3), the
     longest passing path wins (ties: the more likely), and the token after it is the target's argmax (the
     paper's greedy first token). `TypicalAcceptance` below; each round records the thresholds.
Departures: the widths are uniform per depth (Medusa ships hand-tuned sparse trees of 64 nodes); heads predict
over a reduced draft vocabulary V_d (their output rows start as the LM head's rows for V_d).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Detail, Event
from explorer.heads import resolve_head
from explorer.params import param
from explorer.sampling import SamplingFilters
from explorer.strategies.acceptance import Acceptance, DraftTree, Verdict
from explorer.strategies.base import register, tree_prepare
from explorer.strategies.draft_verify import Drafter, SpeculativeConfig, draft_verify
from explorer.trees import children, parse_widths, path_to, uniform_tree_size

ACCEPTANCES = ("exact", "typical")


def typical_threshold(p: torch.Tensor, posterior_threshold: float, posterior_alpha: float) -> float:
    """The bar a drafted token's p must clear: min(epsilon, delta * exp(-H(p))), H in nats (0 log 0 = 0; the
    authors' code takes log(p + 1e-5), a guard that shifts H by at most ~1e-5 per vocabulary entry)."""
    logp = torch.log(p.clamp_min(1e-300))
    entropy = float(-(p * logp).sum())
    return min(posterior_threshold, posterior_alpha * math.exp(-entropy))


@dataclass(frozen=True)
class TypicalAcceptance(Acceptance):
    """Medusa's typical acceptance (Cai et al. 2024, arXiv:2401.10774, Sec. 2.3.1; FasterDecoding/Medusa:
    medusa/model/utils.py: evaluate_posterior): a hard threshold epsilon (`posterior_threshold`) and an
    entropy-scaled one delta (`posterior_alpha`), on p filtered by `filters`. It searches every path of the tree
    rather than walking one (see `verify`)."""

    posterior_threshold: float
    posterior_alpha: float
    filters: SamplingFilters
    name = "typical"
    lossless = False

    def verify(self, logits: torch.Tensor, draft: DraftTree, context: Sequence[int], rng: torch.Generator,
               hidden_states: torch.Tensor | None = None) -> Verdict:
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
            p = torch.softmax(self.filters.apply(logits[node + 1], [*context, *tokens]), dim=-1)  # (vocab,)
            bar = typical_threshold(p, self.posterior_threshold, self.posterior_alpha)
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


@dataclass(frozen=True)
class MedusaConfig(SpeculativeConfig):
    widths: str = param("3,2,1", "top-k tokens of head 1, 2, ... (children per node at each depth)")
    drafter: str = param("", "directory of trained Medusa heads (head.json + head.safetensors); empty: the heads "
                             "shipped for this model in assets/drafters", model=True)
    acceptance: str = param("exact", "sampling rule: exact (speculative sampling, lossless) or typical (Medusa's "
                                     "typical acceptance, p > min(ε, δ·exp(−H)); LOSSY: faster, not distributed "
                                     "as the target)", choices=ACCEPTANCES)
    posterior_threshold: float = param(0.09, "typical acceptance: the hard threshold ε (authors: 0.09)",
                                       minimum=0.0, maximum=1.0, step=0.01)
    posterior_alpha: float = param(0.3, "typical acceptance: δ, the entropy-scaled threshold δ·exp(−H) "
                                        "(authors: 0.3 ≈ √ε)", minimum=0.0, maximum=1.0, step=0.01)

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_widths(self.widths)
        if self.acceptance == "typical" and self.rule != "sampling":
            raise ValueError("typical acceptance is a sampling rule: set rule to sampling (under the greedy rule "
                             "Medusa matches the argmax, as acceptance = exact does)")

    def typical(self) -> TypicalAcceptance | None:
        """The typical-acceptance thresholds, or None for exact acceptance."""
        if self.acceptance != "typical":
            return None
        return TypicalAcceptance(self.posterior_threshold, self.posterior_alpha, self)

    def draft_nodes(self) -> int:
        return uniform_tree_size(parse_widths(self.widths))


def medusa_tree(candidates: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """Step 1: (tokens, parents, depth of each node) of the tree whose depth-k nodes are candidates[k] under
    every node of depth k - 1, breadth-first."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    frontier = [-1]
    for depth, level in enumerate(candidates):
        new = []
        for parent in frontier:
            for token in level:
                tokens.append(int(token))
                parents.append(parent)
                depths.append(depth)
                new.append(len(tokens) - 1)
        frontier = new
    return tokens, parents, depths


class MedusaDrafter(Drafter):
    name = "Medusa heads"
    wants_hidden_states = True
    wants_prefill_hidden_states = True

    def __init__(self, heads: Any, config: MedusaConfig):
        self.heads, self.widths = heads, parse_widths(config.widths)[: len(heads.blocks)]
        self.feature: torch.Tensor | None = None  # h at the last position the target processed

    def observe_prefill(self, inputs: Sequence[int], logits: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.feature = hidden_states[-1, -1]

    @torch.inference_mode()
    def propose(self, context: Sequence[int]) -> DraftTree:
        if self.feature is None:  # a one-token prompt: nothing processed yet; a one-token draft gets h verified
            return DraftTree.chain([int(self.heads.draft_ids[0])])
        scores = self.heads(self.feature.unsqueeze(0))[:, 0]  # (K, |V_d|)
        candidates = []
        confidence = []
        for k, width in enumerate(self.widths):
            top = torch.topk(torch.softmax(scores[k].float(), dim=-1), width)
            candidates.append([int(self.heads.draft_ids[i]) for i in top.indices.tolist()])
            confidence.append(top.values.tolist())
        tokens, parents, depths = medusa_tree(candidates)
        probs = [confidence[d][candidates[d].index(t)] for t, d in zip(tokens, depths, strict=True)]
        tree = DraftTree(tokens, parents, probs, None, mode="point")
        tree.details["nodes"] = float(len(tokens))
        return tree

    def observe(self, verdict: Verdict) -> None:
        if verdict.hidden_states is not None:
            last = verdict.path[-1] + 1 if verdict.path else 0
            self.feature = verdict.hidden_states[-1, last]


def prepare(model: Any, config: MedusaConfig) -> None:
    tree_prepare(model, config)
    resolve_head(model, config.drafter, "medusa")


@register("medusa", MedusaConfig, "Medusa: trained heads guess the next tokens from one hidden state, verified as "
          "a tree", prepare=prepare, family="speed-up: draft-verify",
          paper="Cai et al. 2024, Medusa, arXiv:2401.10774",
          reference_code="FasterDecoding/Medusa: medusa/model/utils.py: generate_candidates, evaluate_posterior",
          departures=(
              "uniform widths per depth (the Cartesian product of the heads' top-k), not the authors' hand-tuned "
              "sparse 64-node trees (medusa_choices)",
              "the heads are trained here for minutes on local text over a reduced draft vocabulary V_d, not on "
              "ShareGPT over the full vocabulary (released Medusa-1 heads can be loaded instead)",
              "under the sampling rule the default acceptance is exact speculative sampling (lossless); the paper's "
              "typical acceptance is the lossy option acceptance = typical",
              "typical acceptance takes p from the configured filters (temperature, and top-k / top-p when set; "
              "the authors apply temperature only) and exact entropy (the authors: log(p + 1e-5))",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: MedusaConfig, rng: torch.Generator) -> Iterator[Event]:
    drafter = MedusaDrafter(resolve_head(model, config.drafter, "medusa"), config)
    yield from draft_verify(model, prompt_ids, drafter, config, rng, acceptance=config.typical())
