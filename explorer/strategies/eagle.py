"""EAGLE: speculative decoding with a trained feature-level draft head (Li, Wei, Zhang, Zhang 2024, "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty", arXiv:2401.15077); the head is explorer.heads.

Notation: c = committed tokens, f_j = the target's feature after c_j (its normed last hidden state), f^ = the
head's predicted feature, V_d = the head's draft vocabulary, gamma = draft length.
1. Feed the head the pairs (e(c_(j+1)), f_j) it has not seen (the real features come from the target's own
   passes: the prompt pass, then each verification); its output at the last pair, whose token is the last
   committed one, predicts the first draft token.
2. Draft autoregressively in feature space: the pair (e(d_i), f^) gives the next f^, gamma tokens in all
   (argmax under the greedy rule; a draw from the filtered q over V_d under the sampling rule). Departure:
   EAGLE-1 drafts a static tree; a chain here is gamma long, and adaptive by default (DraftLength).
3. The target verifies the chain in one pass (exact under both rules: q is 0 outside V_d), and its hidden states
   give the real features of the accepted positions for the next round; the head's speculative pairs are
   dropped from its cache.
The head is loaded from `drafter`: a directory written by `python -m explorer train-drafter`, or a released
EAGLE-1 or EAGLE-3 head (a directory or Hub id: explorer.heads.load_published; an EAGLE-3 head reads the fused
low/mid/high hidden states instead of f_j and scores with its own LM head); empty: the head shipped for the model.
`tree=dynamic` drafts EAGLE-2's dynamic tree instead of a chain (Li et al. 2024, arXiv:2406.16858), as the
authors' SafeAILab/EAGLE: eagle/model/cnets.py: Model.topK_genrate does: expand the top-k nodes per level, then
rerank the whole pool of candidates by path score (see _dynamic). See explorer/heads.py for the heads' departures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.heads import resolve_head
from explorer.models import tree_attention_masks
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_models import ChainDraftConfig
from explorer.strategies.draft_verify import Drafter, DraftLength, DraftTree, Verdict, draft_verify


@dataclass(frozen=True)
class EagleConfig(ChainDraftConfig):
    tree: str = param("chain", "chain: gamma tokens; dynamic: EAGLE-2's tree (expand the tree_top_k most confident "
                               "nodes per level, keep the budget best of all candidates)", choices=("chain", "dynamic"))
    tree_top_k: int = param(4, "dynamic tree: nodes expanded per level and children per node (EAGLE-2's top-k; "
                                "the sampling rule's top_k filters the distributions)", minimum=1, maximum=10, step=1)
    depth: int = param(5, "dynamic tree: levels (the authors' depth + 1)", minimum=1, maximum=10, step=1)
    budget: int = param(16, "dynamic tree: nodes kept for verification, the best of the tree_top_k + (depth - 1) * "
                             "tree_top_k^2 candidates (EAGLE-2's total_tokens)", minimum=1, maximum=64, step=1)

    def draft_nodes(self) -> int:
        return self.budget if self.tree == "dynamic" else self.draft_length
    drafter: str = param("", "directory of a trained draft head (head.json + head.safetensors); empty: the head "
                             "shipped for this model in assets/drafters", model=True)
    draft_length: int = param(5, "maximum draft length gamma", minimum=1, maximum=16, step=1)


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

    def __init__(self, model: Any, head: Any, config: EagleConfig, rng: torch.Generator):
        from transformers import DynamicCache

        self.model, self.head, self.config, self.rng = model, head, config, rng
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
        if self.config.tree == "dynamic":
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
        config, k = self.config, self.config.tree_top_k
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
        for _ in range(config.depth - 1):
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
        keep = sorted(best_nodes(range(len(tokens)), scores, config.budget))  # rerank the whole pool
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


def prepare(model: Any, config: EagleConfig) -> None:
    resolve_head(model, config.drafter, "eagle")


@register("eagle", EagleConfig, "EAGLE: a trained head drafts from the target's own features", prepare=prepare,
          family="speed-up: draft-verify", paper="Li et al. 2024, EAGLE, arXiv:2401.15077",
          reference_code="SafeAILab/EAGLE: eagle/model/cnets.py: Model.topK_genrate (EAGLE-2 tree), "
                         "eagle/train/main.py (EAGLE-1 training loss and noise)",
          departures=(
              "the head is trained here on this machine's data (local text or the target's own answers, minutes), "
              "not on ShareGPT for days; a released EAGLE-1/3 head can be loaded instead",
              "our trained head drafts over a reduced vocabulary V_d (FR-Spec, EAGLE-3's d2t), EAGLE-1's over the "
              "whole vocabulary; q is zero outside V_d",
              "our trained head keeps an input norm and a final norm that EAGLE-1's head lacks (explorer/heads.py)",
              "tree=chain (the default) drafts one chain of gamma tokens, adaptive by default; EAGLE-1 drafts a "
              "static tree",
              "dynamic tree: smaller defaults (top-k 4, 5 levels, budget 16) than the authors' (top-k 10, depth 7, "
              "60 tokens), and a fixed tie order where the authors' torch.topk leaves ties to the implementation",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: EagleConfig, rng: torch.Generator) -> Iterator[Event]:
    drafter = EagleDrafter(model, resolve_head(model, config.drafter, "eagle"), config, rng)
    yield from draft_verify(model, prompt_ids, drafter, config, rng)
