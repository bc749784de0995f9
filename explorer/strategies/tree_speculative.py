"""Tree speculation: the drafter proposes a tree of candidates, the target verifies the whole tree in one pass
(tree attention mask) and keeps the longest accepted root-to-leaf path plus a bonus token.

Tree shapes (notation: q = draft distribution at a node, k = children per node, D = depth, B = node budget):
- `topk`: the k most likely tokens of q under every node, D levels (SpecInfer-style fixed trees; Miao et al.
  2024, arXiv:2305.09781). Deterministic children: verified as point masses.
- `sample`: k i.i.d. draws from q under every node ("Multi-Candidate Speculative Decoding", Yang et al. 2024,
  arXiv:2401.06706); verified by multi-draft speculative sampling.
- `gumbel`: k draws without replacement (Gumbel-top-k: the k largest log q + Gumbel noise), as in "Recursive
  Speculative Decoding" (Jeon et al. 2024, arXiv:2402.14160); verified by recursive rejection sampling.
- `dynamic`: DySpec's dynamic tree (Xiong et al. 2024, arXiv:2410.11744). Every node's value v estimates how
  likely the target is to reach it: v(root) = 1; a parent's next child slot has value v(parent) x R, R = the
  mass of q not yet drawn under that parent. Each draft pass takes *every* slot with value >= `threshold`
  (highest first, up to the budget B), draws its child from q without replacement (the most likely remaining
  token under the greedy rule, a draw from the remaining q renormalised under the sampling rule), v(child) =
  v(parent) x q(child), and runs all the new nodes through the draft at once (one pass per expansion wave);
  verified by recursive rejection sampling without replacement (exact), or the greedy rule.
The drafter is a draft model ('target' = the model itself) or the model with layers skipped. The draft builds
each level in one pass of its own (tree mask over its KV cache), and drops the tree from its cache afterwards.
Drafts that run the target's own layers (itself, a layer-skip view) draft on the target's own KV cache, as
Draft & Verify does (see draft_models.DraftCache).

Authors' code compared: NJUNLP/MCSD MCSD/inference/strategies.py (TreeStrategy; _MCSSwReplacement and
_MCSSwoReplacement are the sample and without-replacement acceptance rules used here). SpecInfer's
flexflow/FlexFlow was not compared; RSD and DySpec published no code we found. Departures: one width k for every
level (SpecInfer and MCSD take a width per level, k_config); topk children under the sampling rule are verified as
point masses (MCSD at draft temperature 0 uses the renormalised top-k q); the dynamic tree expands every slot above
the threshold per draft pass (our reading of DySpec); the default drafter is a layer-skip view of the target, not
a separate small model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.draft_source import TARGET, DraftSource
from explorer.events import Event
from explorer.params import param
from explorer.strategies.base import register, tree_prepare
from explorer.strategies.draft_models import (
    DraftCache,
    layer_skip_view,
    load_draft_model,
    parse_layers,
    shares_weights,
)
from explorer.strategies.draft_verify import Drafter, DraftTree, SpeculativeConfig, draft_verify
from explorer.trees import path_to

MODES = ("topk", "sample", "gumbel", "dynamic")
SIBLING_MODE = {"topk": "point", "sample": "iid", "gumbel": "without_replacement"}


@dataclass(frozen=True)
class TreeConfig(SpeculativeConfig):
    mode: str = param("topk", "tree shape: topk, sample (i.i.d.), gumbel (without replacement), dynamic",
                      choices=MODES)
    branching: int = param(2, "children per node k (topk, sample, gumbel)", minimum=1, maximum=8, step=1)
    depth: int = param(3, "tree depth D (topk, sample, gumbel)", minimum=1, maximum=8, step=1)
    budget: int = param(8, "nodes of a dynamic tree", minimum=1, maximum=64, step=1)
    threshold: float = param(0.05, "dynamic: expand a slot while its estimated value v is at least this",
                             minimum=0.0001, maximum=1.0, step=0.0001)
    draft_model: str = param("layer-skip", "drafter: 'layer-skip' (the target minus its middle quarter of layers), "
                             "'target' (itself: accepts everything, saves nothing), or an HF id / local path of a "
                             "model with the target's vocabulary", model=True)
    skip: str = param("", "draft with the target minus these layers instead, e.g. '10-14' (overrides draft_model)")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_layers(self.skip)

    def draft_nodes(self) -> int:
        """branching^1 + ... + branching^depth (a dynamic tree: its budget)."""
        if self.mode == "dynamic":
            return self.budget
        return sum(self.branching ** level for level in range(1, self.depth + 1))


def gumbel_top_k(log_q: torch.Tensor, k: int, rng: torch.Generator) -> list[int]:
    """k distinct tokens, distributed as sampling from q without replacement (Gumbel-top-k trick)."""
    uniform = torch.rand(log_q.shape, generator=rng, device=log_q.device).clamp(1e-20, 1.0)
    return torch.topk(log_q - torch.log(-torch.log(uniform)), k).indices.tolist()


class TreeDrafter(Drafter):
    """Grows a draft tree with a model (a draft model, the target itself, or a layer-skip view of it), one
    draft pass per level (or per node for dynamic trees), and drops the tree from its cache afterwards."""

    def __init__(self, lm: Any, config: TreeConfig, rng: torch.Generator, name: str, *, shared: bool = False):
        self.lm, self.config, self.rng, self.name = lm, config, rng, name
        self.cache = DraftCache(lm, shared)

    @property
    def session(self) -> Any:
        return self.cache.session

    def bind(self, target_session: Any) -> None:
        self.cache.bind(target_session)

    def propose(self, context: Sequence[int]) -> DraftTree:
        base = len(context)
        passes = self.lm.forward_passes
        root = self.config.draft_distribution(self.cache.start(context), context)  # the cache holds `base` positions
        tree = self._dynamic(context, root, base) if self.config.mode == "dynamic" else self._levels(context, root,
                                                                                                    base)
        self.cache.finish()  # the tree leaves the draft's cache
        tree.details.update(nodes=float(len(tree.tokens)), draft_forward_passes=float(self.lm.forward_passes - passes))
        return tree

    @staticmethod
    def _path_tokens(parents: list[int], tokens: list[int], node: int) -> list[int]:
        """The drafted tokens from the root down to `node`."""
        return [tokens[i] for i in path_to(parents, node)]

    def _levels(self, context: Sequence[int], root: torch.Tensor, base: int) -> DraftTree:
        config, k = self.config, self.config.branching
        tokens: list[int] = []
        parents: list[int] = []
        draft_probs: list[float] = []
        rows: list[torch.Tensor] = []
        frontier = [(-1, root)]  # (node, its q)
        for level in range(config.depth):
            new: list[int] = []
            for node, q in frontier:
                if config.mode == "topk":
                    chosen = torch.topk(q, min(k, q.shape[-1])).indices.tolist()
                elif config.mode == "sample":
                    chosen = torch.multinomial(q, k, replacement=True, generator=self.rng).tolist()
                else:
                    chosen = gumbel_top_k(torch.log(q.clamp_min(1e-30)), min(k, int((q > 0).sum())), self.rng)
                for token in chosen:
                    tokens.append(int(token))
                    parents.append(node)
                    draft_probs.append(float(q[token]))
                    rows.append(q)
                    new.append(len(tokens) - 1)
            if level + 1 == config.depth or not new:
                break
            logits = self.session.forward([tokens[i] for i in new], parents=parents, tree_base=base).logits  # one pass
            frontier = [(node, self.config.draft_distribution(logits[j], [*context,
                                                                          *self._path_tokens(parents, tokens, node)]))
                        for j, node in enumerate(new)]
        mode = SIBLING_MODE[config.mode]
        q_dists = torch.stack(rows) if rows and mode != "point" else None  # point masses need no q rows
        return DraftTree(tokens, parents, draft_probs, q_dists, mode=mode)

    def _dynamic(self, context: Sequence[int], root: torch.Tensor, base: int) -> DraftTree:
        """DySpec: expand every child slot whose value clears the threshold, one draft pass per wave."""
        config, sampling = self.config, self.config.rule == "sampling"
        tokens: list[int] = []
        parents: list[int] = []
        draft_probs: list[float] = []
        rows: list[torch.Tensor] = []
        q_of: dict[int, torch.Tensor] = {-1: root}  # node -> its q (the original, for verification)
        left: dict[int, torch.Tensor] = {-1: root.clone()}  # node -> q mass not drawn yet
        value: dict[int, float] = {-1: 1.0}
        waves = 0
        while len(tokens) < config.budget:
            slots = sorted(((value[n] * float(left[n].sum()), n) for n in left), reverse=True)
            slots = [(v, n) for v, n in slots if v >= config.threshold and float(left[n].sum()) > 0]
            if not slots:
                break
            new: list[int] = []
            for _, node in slots[: config.budget - len(tokens)]:
                remaining = left[node]
                token = (int(torch.multinomial(remaining / remaining.sum(), 1, generator=self.rng)) if sampling
                         else int(remaining.argmax()))
                remaining[token] = 0.0
                tokens.append(token)
                parents.append(node)
                draft_probs.append(float(q_of[node][token]))
                rows.append(q_of[node])
                value[len(tokens) - 1] = value[node] * float(q_of[node][token])
                new.append(len(tokens) - 1)
            waves += 1
            if len(tokens) >= config.budget:
                break
            logits = self.session.forward([tokens[i] for i in new], parents=parents, tree_base=base).logits  # one pass
            for j, node in enumerate(new):
                q = self.config.draft_distribution(logits[j], [*context, *self._path_tokens(parents, tokens, node)])
                q_of[node], left[node] = q, q.clone()
        tree = DraftTree(tokens, parents, draft_probs, torch.stack(rows) if sampling and rows else None,
                         mode="without_replacement" if sampling else "point")
        tree.details["waves"] = float(waves)
        return tree


def tree_drafter(model: Any, config: TreeConfig, rng: torch.Generator) -> TreeDrafter:
    """Drafts that run the target's own layers (itself, a layer-skip view) draft on the target's cache."""
    if config.skip.strip():
        return TreeDrafter(layer_skip_view(model, parse_layers(config.skip)), config, rng, "layer-skip tree",
                           shared=True)
    if DraftSource.parse(config.draft_model).kind == TARGET:
        return TreeDrafter(model.for_run(), config, rng, f"{config.mode} tree (self)", shared=True)
    draft = load_draft_model(model, config.draft_model)
    return TreeDrafter(draft, config, rng, f"{config.mode} tree from {draft.info.model_id}",
                       shared=shares_weights(model, draft))


def prepare(model: Any, config: TreeConfig) -> None:
    tree_prepare(model, config)
    if config.skip.strip():
        layer_skip_view(model, parse_layers(config.skip))
    elif DraftSource.parse(config.draft_model).kind != TARGET:
        load_draft_model(model, config.draft_model)  # a layer-skip view checks the model has layers to skip


@register("tree_speculative", TreeConfig, "tree speculation: topk / sample / gumbel / dynamic draft trees",
          prepare=prepare,
          family="speed-up: draft-verify",
          paper=("SpecInfer, Miao et al. 2024, arXiv:2305.09781; RSD, Jeon et al. 2024, arXiv:2402.14160; DySpec, "
                 "Xiong et al. 2024, arXiv:2410.11744"),
          reference_code=("NJUNLP/MCSD: MCSD/inference/strategies.py: TreeStrategy, _MCSSwReplacement, "
                          "_MCSSwoReplacement (SpecInfer's flexflow/FlexFlow not compared; RSD, DySpec: none public)"),
          departures=(
              "One width k for every level; SpecInfer and MCSD take a width per level (k_config).",
              "topk children are verified as point masses under the sampling rule (exact); MCSD at draft temperature "
              "0 uses the renormalised top-k q, and SpecInfer's multi-step sampling assumes sampled children.",
              "dynamic: every child slot whose value v(parent)·R clears the threshold is expanded in one draft pass "
              "per wave, up to the budget; our reading of DySpec, whose code was not available.",
              "The default drafter is the target minus its middle quarter of layers (on the target's KV cache); the "
              "papers draft with separate small models.",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: TreeConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, tree_drafter(model, config, rng), config, rng)
