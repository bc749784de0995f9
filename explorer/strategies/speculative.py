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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.models import MODEL_CACHE, check_same_vocabulary
from explorer.strategies.base import param, register
from explorer.strategies.draft_verify import DraftLength, DraftTree, SpeculativeConfig, Verdict, draft_verify

SELF = ("", "target")


@dataclass(frozen=True)
class DraftModelConfig(SpeculativeConfig):
    draft_model: str = param("target", "HF id or local path sharing the target's vocabulary ('target' = itself)")
    draft_length: int = param(4, "maximum draft length gamma", minimum=1, maximum=16, step=1)
    adaptive: bool = param(True, "grow gamma after full acceptance, shrink it after a rejection")
    fallback_threshold: float = param(0.0, "stop drafting when the draft's top probability is below this (0 = off)",
                                      minimum=0.0, maximum=0.99, step=0.01)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draft_length < 1:
            raise ValueError("draft_length must be >= 1")
        if not 0 <= self.fallback_threshold < 1:
            raise ValueError("fallback_threshold must be in [0, 1)")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def load_draft_model(model: Any, draft_model: str) -> Any:
    """The drafting model for a run: the target itself ('target'), or a model sharing its vocabulary."""
    if draft_model.strip() in SELF:
        return model.for_run()
    draft = MODEL_CACHE.get(draft_model, dtype=model.info.dtype, device=model.info.device).for_run()
    check_same_vocabulary(model, draft)
    return draft


def sync_cache(session: Any, cached: list[int], context: Sequence[int]) -> torch.Tensor:
    """Bring a draft's KV cache (holding the tokens `cached`) to the committed context: keep the common prefix,
    run the rest, and return the draft's next-token logits `(vocab,)`. `cached` becomes the context."""
    keep = min(common_prefix(cached, context), len(context) - 1)
    session.crop(keep)
    logits = session.forward(list(context[keep:]), all_logits=False)[-1]
    cached[:] = context
    return logits


class ModelDrafter:
    """Drafts with any language model that has its own KV cache, kept in sync with the committed context."""

    def __init__(self, lm: Any, config: Any, rng: torch.Generator, name: str):
        self.lm, self.config, self.rng, self.name = lm, config, rng, name
        self.length = DraftLength(config.draft_length, config.adaptive)
        self.session = lm.session()
        self.cached: list[int] = []  # the tokens in the draft's KV cache
        self._drafted = 0

    def reset(self, lm: Any) -> None:
        self.lm, self.session, self.cached = lm, lm.session(), []

    def propose(self, context: Sequence[int]) -> DraftTree:
        gamma = self.length.current
        passes = self.lm.forward_passes
        logits = sync_cache(self.session, self.cached, context)  # (vocab,)
        tokens: list[int] = []
        scores: list[float] = []
        rows: list[torch.Tensor] = []
        fell_back = 0.0
        sampling = self.config.rule == "sampling"
        for i in range(gamma):
            q = torch.softmax(self.config.apply(logits, [*context, *tokens]) if sampling else logits, dim=-1)
            if self.config.fallback_threshold and float(q.max()) < self.config.fallback_threshold:
                fell_back = 1.0  # the draft is unsure: hand the step to the target
                break
            token = int(torch.multinomial(q, 1, generator=self.rng)) if sampling else int(q.argmax())
            tokens.append(token)
            scores.append(float(q[token]))
            rows.append(q)
            if i + 1 < gamma:
                logits = self.session.forward([token])[-1]
                self.cached.append(token)
        self._drafted = len(tokens)
        q_dists = torch.stack(rows) if sampling and rows else None
        return DraftTree.chain(tokens, scores, q_dists, gamma=float(gamma), fallback=fell_back,
                               draft_forward_passes=float(self.lm.forward_passes - passes))

    def observe(self, verdict: Verdict) -> None:
        self.length.update(verdict, self._drafted)


@register("speculative", DraftModelConfig, "speculative decoding with a draft model (greedy or sampling rule)")
def run(model: Any, prompt_ids: Sequence[int], config: DraftModelConfig, rng: torch.Generator) -> Iterator[Any]:
    draft = load_draft_model(model, config.draft_model)
    drafter = ModelDrafter(draft, config, rng, name=f"draft model {draft.info.model_id}")
    yield from draft_verify(model, prompt_ids, drafter, config, rng)
