"""Speculative decoding with a draft model (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318), with an adaptive draft length and an optional Big Little Decoder style fallback (Kim et al.
2023, "Speculative Decoding with Big Little Decoder", arXiv:2302.07863).

Notation: p = target, q = draft, gamma = draft length. Each round the draft model proposes gamma tokens
autoregressively (argmax under the greedy rule, a draw from the filtered q under the sampling rule); the target
verifies them in one pass (see draft_verify). gamma doubles after a fully accepted draft and falls to
the accepted count + 1 after a rejection. Fallback (BiLD): drafting stops early when the draft's top
probability is below `fallback_threshold`, handing the step to the target.
Departure from BiLD: its rollback policy (re-checking the small model's tokens by distance) is replaced by the
exact verification above, so the output is unchanged by the fallback.
The draft model: any model with the target's vocabulary; by default ('layer-skip') the target itself with its
middle quarter of layers skipped (Draft & Verify's drafter, drafting on the target's own KV cache), since no
separate small model is available offline; 'target' drafts with the full target (it accepts everything and
saves nothing).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_models import ChainDraftConfig, ModelDrafter, load_draft_model, shares_weights
from explorer.strategies.draft_verify import draft_verify


@dataclass(frozen=True)
class DraftModelConfig(ChainDraftConfig):
    draft_model: str = param("layer-skip", "drafter: 'layer-skip' (the target minus its middle quarter of layers), "
                             "'target' (itself: accepts everything, saves nothing), or an HF id / local path of a "
                             "model with the target's vocabulary", model=True)
    fallback_threshold: float = param(0.0, "stop drafting when the draft's top probability is below this (0 = off)",
                                      minimum=0.0, maximum=0.99, step=0.01)


def prepare(model: Any, config: DraftModelConfig) -> None:
    load_draft_model(model, config.draft_model)  # loaded once (cached) and checked before the run starts


@register("speculative", DraftModelConfig, "speculative decoding with a draft model (greedy or sampling rule)",
          prepare=prepare,
          family="speed-up: draft-verify",
          paper="Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318")
def run(model: Any, prompt_ids: Sequence[int], config: DraftModelConfig, rng: torch.Generator) -> Iterator[Event]:
    draft = load_draft_model(model, config.draft_model)
    drafter = ModelDrafter(draft, config, rng, f"draft model {draft.info.model_id}", config.fallback_threshold,
                           shared=shares_weights(model, draft))
    yield from draft_verify(model, prompt_ids, drafter, config, rng)
