"""The EAGLE head's drafter (Li, Wei, Zhang, Zhang 2024, arXiv:2401.15077; the head is explorer.heads), beside
the model drafters of draft_models: the `eagle` strategy drafts with it (a chain, or EAGLE-2's dynamic tree), and
so does `speculative` when its draft source is the shipped head, each calling draft_verify itself. See
strategies/eagle.py for the notation and the departures. Strategies import this module; it imports no strategy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.models import tree_attention_masks
from explorer.strategies.draft_models import ChainDraftConfig
from explorer.strategies.draft_verify import Drafter, DraftLength, DraftTree, Verdict


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's dynamic tree settings: `top_k` nodes expanded per level (and children per node), `depth` levels,
    `budget` nodes kept for verification."""

    top_k: int
    depth: int
    budget: int


def best_nodes(nodes: Iterable[int], scores: Sequence[float], count: int) -> list[int]:
    """The `count` nodes with the highest path score s, best first; ties go to the node generated first.
    Taken from a whole pool this set is a tree: a parent was generated before its child and s(child) =
    s(parent) + log q <= s(parent) (also in floating point), so it ranks ahead of the child. The authors' code
    gets the same from torch.topk, which leaves ties to the implementation (departure: our tie order is fixed)."""
    return sorted(nodes, key=lambda node: (-scores[node], node))[:count]


class EagleDrafter(Drafter):
    name = "EAGLE head"
    wants_hidden_states = True  # the verification pass's last hidden states are the next real features
    wants_prefill_hidden_states = True  # so are the prompt's
    watches_logits = True  # draft-vocabulary coverage: is the target's token at each verified position in V_d?

    def __init__(self, model: Any, head: Any, config: ChainDraftConfig, rng: torch.Generator,
                 tree: DynamicTree | None = None):
        from transformers import DynamicCache

        self.model, self.head, self.config, self.rng, self.tree = model, head, config, rng, tree
        self.embed = model.model.get_input_embeddings()
        self.lm_head = model.model.get_output_embeddings().weight
        self.cache = DynamicCache(config=head.body.config)
        self.features: list[torch.Tensor] = []  # f_0 .. f_(m-1): the target's real features, (hidden,) each
        self.fed = 0  # real pairs in the head's cache
        self.length = DraftLength(config.draft_length, config.adaptive)
        self._drafted = 0
        self._coverage = ""
        self._features: dict[int, torch.Tensor] = {}  # dynamic tree: each expanded node's predicted feature

    def observe_logits(self, inputs: Sequence[int], logits: torch.Tensor, parents: Sequence[int] | None) -> None:
        if self._drafted and len(inputs) == self._drafted + 1:  # a verification pass (not the prompt's)
            inside = torch.isin(logits.argmax(dim=-1), self.head.draft_ids)
            self._coverage = ",".join("1" if x else "0" for x in inside.tolist())

    def round_details(self) -> dict[str, float | str]:
        """Per verified position: whether the target's own token there is one the head could have drafted."""
        return {"target_in_vocab": self._coverage} if self._coverage else {}

    def observe_prefill(self, inputs: Sequence[int], logits: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.features.extend(self.head.feature(hidden_states))

    def _q(self, scores: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """The draft distribution over the full vocabulary (zero outside V_d)."""
        full = torch.full((self.lm_head.shape[0],), float("-inf"), device=scores.device)
        full[self.head.draft_ids] = scores.float()
        return self.config.draft_distribution(full, history)

    @torch.inference_mode()
    def propose(self, context: Sequence[int]) -> DraftTree:
        needed = len(context) - 1  # pairs j = 0 .. n-2: (e(c_(j+1)), f_j)
        if needed == 0:  # a one-token prompt: no feature yet; any one-token draft gets the first one verified
            self._drafted = 1
            return DraftTree.chain([int(self.head.draft_ids[0])])
        if len(self.features) < needed:
            raise RuntimeError("the EAGLE head is missing target features")
        speculative = self.cache.get_seq_length() - self.fed
        if speculative > 0:
            self.cache.crop(-speculative)  # last round's drafted pairs leave the head's cache
        ids = torch.tensor(list(context[self.fed + 1: needed + 1]), device=self.model.device)
        features = torch.stack(self.features[self.fed:needed]).unsqueeze(0)  # (1, new pairs, hidden)
        predicted = self.head.predict(self.embed(ids).unsqueeze(0), features, self.cache)[:, -1]  # 1.
        self.fed = needed
        if self.tree is not None:
            return self._dynamic(context, predicted)
        tokens: list[int] = []
        probs: list[float] = []
        rows: list[torch.Tensor] = []
        for i in range(self.length.current):  # 2.
            q = self._q(self.head.logits(predicted[0], self.lm_head), [*context, *tokens])
            token = int(torch.multinomial(q, 1, generator=self.rng)) if self.config.rule == "sampling" \
                else int(q.argmax())
            tokens.append(token)
            probs.append(float(q[token]))
            rows.append(q)
            if i + 1 < self.length.current:
                embed = self.embed(torch.tensor([[token]], device=self.model.device))
                predicted = self.head.predict(embed, predicted.unsqueeze(1), self.cache)[:, -1]
        self._drafted = len(tokens)
        q_dists = torch.stack(rows) if self.config.rule == "sampling" else None
        return DraftTree.chain(tokens, probs, q_dists, gamma=float(self.length.current))

    def _dynamic(self, context: Sequence[int], predicted: torch.Tensor) -> DraftTree:
        """EAGLE-2's dynamic draft tree (Li, Wei, Zhang, Zhang 2024, arXiv:2406.16858), built as the authors' code
        builds it (SafeAILab/EAGLE: eagle/model/cnets.py: Model.topK_genrate). Notation: k = tree_top_k,
        s(node) = the sum of the head's log-probabilities along the node's path (its value, exp(s), is the product
        of the head's confidences), the pool = every candidate the head generated this round.
        Expand: the top k tokens of the head's first distribution are level 1 and the frontier. At each further
        level the frontier goes through the head in one tree-masked pass; each frontier node adds its own top k
        children, s(child) = s(node) + log q(child), so k * k candidates join the pool per level, and the k of
        them with the highest s are the next frontier (the rest stay in the pool unexpanded).
        Pool = k + (depth - 1) * k^2 nodes (68 at k = 4, depth = 5). `depth` counts levels: the authors' `depth`
        counts the head passes after the first, so their depth d is our depth d + 1.
        Rerank: the `budget` nodes of the whole pool with the highest s are verified, as point masses (the
        target's rule decides, exactly; the authors' sampling check also takes q = 1)."""
        tree, k = self.tree, self.tree.top_k
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []  # s(node), the pool's ranking key
        log_q = torch.log_softmax(self.head.logits(predicted[0], self.lm_head).float(), dim=-1)  # (K,) over V_d
        top = torch.topk(log_q, min(k, log_q.numel()))
        for s, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            tokens.append(int(self.head.draft_ids[index]))
            parents.append(-1)
            scores.append(s)
        frontier = list(range(len(tokens)))
        cached: dict[int, int] = {}  # node -> its place among the tree nodes in the head's cache
        for _ in range(tree.depth - 1):
            embeds = self.embed(torch.tensor([[tokens[i] for i in frontier]], device=self.model.device))
            inputs = torch.stack([predicted[0] if parents[i] < 0 else self._features[parents[i]] for i in frontier])
            for node in frontier:
                cached[node] = len(cached)
            order = sorted(cached, key=cached.get)
            tree_parents = [cached[parents[n]] if parents[n] >= 0 else -1 for n in order]
            mask = tree_attention_masks(self.head.body.config, tree_parents, self.fed, inputs.dtype,
                                        self.model.device, new=len(frontier))
            positions = torch.tensor([[self.fed + self._depth(parents, i) for i in frontier]], device=self.model.device)
            out = self.head.predict(embeds, inputs.unsqueeze(0), self.cache, position_ids=positions,
                                    attention_mask=mask)[0]  # (frontier, hidden)
            for row, node in enumerate(frontier):
                self._features[node] = out[row]
            log_children = torch.log_softmax(self.head.logits(out, self.lm_head).float(), dim=-1)  # (frontier, K)
            best = torch.topk(log_children, min(k, log_children.shape[-1]), dim=-1)
            level = []
            for row, node in enumerate(frontier):  # all k children of every frontier node join the pool
                for s, index in zip(best.values[row].tolist(), best.indices[row].tolist(), strict=True):
                    tokens.append(int(self.head.draft_ids[index]))
                    parents.append(node)
                    scores.append(scores[node] + s)
                    level.append(len(tokens) - 1)
            frontier = best_nodes(level, scores, k)
        self._features = {}
        keep = sorted(best_nodes(range(len(tokens)), scores, tree.budget))  # rerank the whole pool
        index = {old: new for new, old in enumerate(keep)}
        tree = DraftTree([tokens[i] for i in keep], [index[parents[i]] if parents[i] >= 0 else -1 for i in keep],
                         [math.exp(scores[i]) for i in keep], None, mode="point")
        tree.details.update(nodes=float(len(keep)), pool=float(len(tokens)))
        self._drafted = len(keep)
        return tree

    @staticmethod
    def _depth(parents: list[int], node: int) -> int:
        depth = 0
        while parents[node] >= 0:
            node, depth = parents[node], depth + 1
        return depth

    def observe(self, verdict: Verdict) -> None:
        """3. The real features of the verified positions that were committed: row 0 (the last committed token)
        and the accepted draft tokens."""
        self.length.update(verdict, self._drafted)
        if verdict.hidden_states is not None:
            rows = [0, *(node + 1 for node in verdict.path)]
            self.features.extend(self.head.feature(verdict.hidden_states)[rows])
