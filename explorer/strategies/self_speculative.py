"""Layer-skip self-speculative decoding: the model with some of its layers skipped drafts for itself (Zhang et
al. 2024, "Draft & Verify", arXiv:2309.08168; CLaSp, Chen et al. 2025, "In-Context Layer Skip for
Self-Speculative Decoding", arXiv:2505.24196). Early exit after the first N layers is the special case
skip = {N, ..., L-1}.

Notation: L = number of layers, S = skipped set, gamma = draft length, p = target, q = the skipped model.
The draft shares weights with the target and keeps its own KV cache (only the kept layers write to it).
Skip-set search (CLaSp's idea, simplified): after a verification, the target's hidden states h_l of the
accepted positions show how much each layer changes its input; CLaSp picks S by dynamic programming over
layers to keep the final hidden state close. Departure: we score each layer by the mean cosine similarity
cos(h_l, h_(l+1)) of its input and output and skip the `auto_skip` most similar layers (a greedy, per-layer
version of that search), re-searched every `search_every` rounds. Layer 0 is never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_models import ChainDraftConfig, ModelDrafter, layer_skip_view, parse_layers
from explorer.strategies.draft_verify import Verdict, draft_verify


@dataclass(frozen=True)
class SelfSpeculativeConfig(ChainDraftConfig):
    skip: str = param("", "layers to skip, e.g. '10-14,20' (0-based; overrides the two below)")
    exit_after: int = param(0, "early exit: keep only the first N layers (0 = off; overrides auto_skip)",
                            minimum=0, maximum=64, step=1)
    auto_skip: int = param(4, "otherwise: skip this many layers, searched from the hidden states", minimum=1,
                           maximum=64, step=1)
    search_every: int = param(8, "rounds between skip-set searches", minimum=1, maximum=64, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_layers(self.skip)


def most_skippable(hidden: torch.Tensor, count: int) -> set[int]:
    """The `count` layers (never the first or last) whose output is most similar to their input.
    `hidden`: (layers + 1, positions, hidden) with hidden[l] the input of layer l."""
    inputs, outputs = hidden[:-1].float(), hidden[1:].float()
    similarity = torch.nn.functional.cosine_similarity(inputs, outputs, dim=-1).mean(dim=-1)  # (layers,)
    similarity[0] = similarity[-1] = -float("inf")
    return set(torch.topk(similarity, min(count, len(similarity) - 2)).indices.tolist())


def initial_skip(model: Any, config: SelfSpeculativeConfig) -> tuple[set[int], bool]:
    """The skipped set to start from, and whether to search for better ones."""
    total = len(model.model.model.layers)
    if config.skip.strip():
        return parse_layers(config.skip), False
    if config.exit_after:
        return set(range(config.exit_after, total)), False
    count = min(config.auto_skip, total - 1)  # start from the middle layers, then search
    first = max(1, (total - count) // 2)
    return set(range(first, first + count)), True


def prepare(model: Any, config: SelfSpeculativeConfig) -> None:
    layer_skip_view(model, initial_skip(model, config)[0])  # refuses sets this model cannot skip


class LayerSkipDrafter(ModelDrafter):
    """A ModelDrafter over a layer-skip view of the target; with a searched skip set it asks the engine for the
    verification pass's hidden states and re-searches every `search_every` rounds."""

    def __init__(self, model: Any, config: SelfSpeculativeConfig, rng: torch.Generator):
        skip, searching = initial_skip(model, config)
        super().__init__(layer_skip_view(model, skip), config, rng, name="layer skip")
        self.target, self.skip, self.rounds = model, skip, 0
        self.search_every, self.auto_skip = config.search_every, config.auto_skip
        self.wants_hidden_states = searching

    def round_details(self) -> dict[str, float | str]:
        return {"skipped_layers": ",".join(str(i) for i in sorted(self.skip)), "skip_count": float(len(self.skip))}

    def observe(self, verdict: Verdict) -> None:
        super().observe(verdict)
        self.rounds += 1
        due = self.rounds % self.search_every == 0
        if self.wants_hidden_states and verdict.hidden_states is not None and due:
            accepted = verdict.hidden_states[:, : verdict.accepted_count + 1]  # positions the target committed
            chosen = most_skippable(accepted, self.auto_skip)
            if chosen != self.skip:
                self.skip = chosen
                self.reset(layer_skip_view(self.target, chosen))  # the draft's cache is rebuilt next round


@register("self_speculative", SelfSpeculativeConfig, "layer-skip self-speculation (CLaSp-style skip search)",
          prepare=prepare,
          family="speed-up: draft-verify",
          paper="Draft & Verify, Zhang et al. 2024, arXiv:2309.08168; CLaSp, Chen et al. 2025, arXiv:2505.24196")
def run(model: Any, prompt_ids: Sequence[int], config: SelfSpeculativeConfig, rng: torch.Generator
        ) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, LayerSkipDrafter(model, config, rng), config, rng)
