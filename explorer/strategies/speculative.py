"""Speculative decoding with a draft model (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318), with an adaptive draft length and an optional Big Little Decoder style fallback (Kim et al.
2023, "Speculative Decoding with Big Little Decoder", arXiv:2302.07863).

Notation: p = target, q = draft, gamma = draft length. Each round the draft model proposes gamma tokens
autoregressively (argmax under the greedy rule, a draw from the filtered q under the sampling rule); the target
verifies them in one pass (see draft_verify). gamma doubles after a fully accepted draft and falls to
the accepted count + 1 after a rejection.
Big Little Decoder (BiLD; Kim et al. 2023, arXiv:2302.07863): the fallback policy stops drafting when the draft's
top probability is below `fallback_threshold` (alpha_FB), handing the step to the target. With `rollback` = 0
(default) the drafts are then verified exactly as above (the output is unchanged by the fallback); with
`rollback` = alpha_RB > 0 they are verified by BiLD's rollback policy instead (`Rollback` below):
keep the small model's tokens up to the first whose cross-entropy -ln p(x) under the large model exceeds
alpha_RB, where the large model's token replaces it. That is BiLD's lossy trade-off: a larger alpha_RB keeps
more of the small model's tokens. Departure: BiLD lets the small model run until it falls back or reaches
num_small_iters (10 in the authors' kssteven418/BigLittleDecoder T5BiLDModel); we stop at the draft length gamma
(draft_length up to 16, adaptive). BiLD's code is greedy and encoder-decoder (T5); under the sampling rule our
rollback samples the large model's token, and with rollback = 0 the fallback drafts are verified exactly (a hybrid:
BiLD always applies its rollback policy).
Further departures (from Leviathan et al. and Chen et al., who published no code): gamma adapts as above (the
papers fix it), and the default drafter is not a separate small model (see below).
A draft model with another tokenizer drafts through universal assisted decoding (draft_models.UniversalDrafter:
its text re-tokenised into target tokens, verified as point masses, still lossless).
The drafter: any causal LM; 'layer-skip', the target itself with its middle quarter of layers skipped (Draft &
Verify's drafter, drafting on the target's own KV cache), since no separate small model is available offline;
'eagle-head', the trained EAGLE head shipped for the target in assets/drafters (the eagle strategy's drafter, as a
chain of up to gamma tokens: see strategies/eagle.py); 'target' drafts with the full target (it accepts everything
and saves nothing). The default, 'auto', is the shipped EAGLE head where the target has one (the embedded model:
a head token costs ~3 % of a target pass, a layer-skip token ~75 %) and layer-skip elsewhere or with a BiLD
setting; the rounds' drafter name says which drafted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.draft_source import AUTO, EAGLE_HEAD, DraftSource
from explorer.events import Event
from explorer.heads import resolve_head, shipped_head
from explorer.params import param
from explorer.strategies.acceptance import DraftTree, Judgement, NodeRule, Walk
from explorer.strategies.base import register
from explorer.strategies.draft_models import (
    ChainDraftConfig,
    ModelDrafter,
    UniversalDrafter,
    load_draft_model,
    same_vocabulary,
    shares_weights,
)
from explorer.strategies.draft_verify import SpeculativeConfig, draft_verify
from explorer.strategies.eagle_drafter import EagleDrafter


@dataclass(frozen=True)
class DraftModelConfig(ChainDraftConfig):
    draft_model: str = param(AUTO, "drafter: 'auto' (the EAGLE head shipped for this model, else layer-skip), "
                             "'eagle-head' (that head), 'layer-skip' (the target minus its middle quarter of layers), "
                             "'target' (itself: accepts everything, saves nothing), or an HF id / local path of a "
                             "model with the target's vocabulary", model=True)
    fallback_threshold: float = param(0.0, "BiLD fallback: stop drafting when the draft's top probability is below "
                                      "this (0 = off)", minimum=0.0, maximum=0.99, step=0.01)
    rollback: float = param(0.0, "BiLD rollback (lossy): keep draft tokens while -ln p(x) under the target is at "
                                 "most this (0 = off: exact verification)", minimum=0.0, maximum=20.0, step=0.1)

    @property
    def bild(self) -> bool:
        """Whether a BiLD setting (fallback or rollback) is on: both need a draft model's distributions."""
        return bool(self.rollback or self.fallback_threshold)


@dataclass
class Rollback(NodeRule):
    """BiLD's rollback policy (Kim et al. 2023, arXiv:2302.07863, Sec. 3.3; kssteven418/BigLittleDecoder:
    `T5BiLDModel._greedy_search_body`), lossy by design, on a chain: the large model's logits `(n + 1, vocab)`
    over the small model's n tokens; roll back at the first token x_i whose distance d = -ln p_i(x_i)
    (cross-entropy of the small model's token under the large model) exceeds alpha_RB, and put the large model's
    own token there instead; with no rollback, the large model's token after the last one follows. The large
    model's token is its argmax (greedy rule) or a draw from its filtered p (sampling rule). With
    alpha_RB < ln 2 every kept token has p > 1/2, so the greedy rule stays exact. Records `rolled_back`, the
    number of draft tokens dropped."""

    alpha: float
    config: SpeculativeConfig
    name = "rollback"
    lossless = False

    def verify(self, logits: torch.Tensor, draft: DraftTree, context: Sequence[int], rng: torch.Generator,
               hidden_states: torch.Tensor | None = None) -> Any:
        if not draft.is_chain:
            raise ValueError("the rollback policy verifies chains only")
        return super().verify(logits, draft, context, rng, hidden_states)

    def judge(self, row: torch.Tensor, kids: list[int], draft: DraftTree, history: list[int],
              rng: torch.Generator, walk: Walk) -> Judgement:
        if kids:
            (kid,) = kids
            logp = torch.log_softmax(row, dim=-1)[draft.tokens[kid]]
            walk.p[kid] = float(logp.exp())
            if -float(logp) <= self.alpha:
                walk.verdicts[kid] = "accepted"
                return Judgement(child=kid)
            walk.verdicts[kid] = "rejected"
        if self.config.rule == "greedy":
            return Judgement(token=int(row.argmax()))
        p = torch.softmax(self.config.apply(row, history), dim=-1)
        return Judgement(token=int(torch.multinomial(p, 1, generator=rng)))

    def details(self, draft: DraftTree, walk: Walk) -> dict[str, float]:
        return {"rolled_back": float(len(draft.tokens) - len(walk.path))}


def drafts_with_head(model: Any, config: DraftModelConfig) -> bool:
    """Whether the shipped EAGLE head drafts: asked for ('eagle-head'), or 'auto' on a target that has one and
    no BiLD setting (those need a draft model's distributions: 'auto' then means layer-skip)."""
    kind = DraftSource.parse(config.draft_model).kind
    return kind == EAGLE_HEAD or (kind == AUTO and not config.bild and shipped_head(model, "eagle") is not None)


def shipped_eagle_head(model: Any, config: DraftModelConfig) -> Any:
    """The EAGLE head shipped for the target (loaded once per process)."""
    if config.bild:
        raise ValueError("BiLD's fallback and rollback need a draft model, not the EAGLE head: set draft_model to "
                         "'auto', 'layer-skip' or a model")
    return resolve_head(model, EAGLE_HEAD, "eagle")


def prepare(model: Any, config: DraftModelConfig) -> None:
    if drafts_with_head(model, config):
        shipped_eagle_head(model, config)  # the head is loaded once (cached) before the run
        return
    draft = load_draft_model(model, config.draft_model, any_tokenizer=True)  # loaded once (cached) before the run
    check_bild(model, draft, config)


def check_bild(model: Any, draft: Any, config: DraftModelConfig) -> None:
    if config.bild and not same_vocabulary(model, draft):
        raise ValueError("BiLD's fallback and rollback need a draft with the target's tokenizer")


@register("speculative", DraftModelConfig, "speculative decoding with a draft model (greedy or sampling rule)",
          prepare=prepare,
          family="speed-up: draft-verify",
          paper="Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318",
          reference_code=("none public (Leviathan et al.; Chen et al.); the BiLD options follow "
                          "kssteven418/BigLittleDecoder: src/transformers/models/t5/modeling_t5.py: "
                          "T5BiLDModel._greedy_search_body"),
          departures=(
              "The draft length adapts (doubles after a fully accepted draft, falls to accepted + 1 after a "
              "rejection); the papers use a fixed gamma.",
              "The default drafter 'auto' is the EAGLE head shipped for the target (drafting an EAGLE chain) or "
              "else the target minus its middle quarter of layers; the papers draft with a separate smaller model.",
              "A draft model with another tokenizer drafts by universal assisted decoding (re-tokenised text, "
              "verified as point masses), which is not in these papers.",
              "BiLD: drafting also stops at gamma (≤ 16); the authors' code stops the small model at its fallback or "
              "after num_small_iters (10).",
              "BiLD with rollback = 0 verifies the fallback drafts exactly (lossless), a hybrid: BiLD always applies "
              "its rollback policy.",
              "BiLD under the sampling rule samples the large model's token from the filtered p; the authors' code is "
              "greedy (argmax) and for encoder-decoder models (T5).",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: DraftModelConfig, rng: torch.Generator) -> Iterator[Event]:
    if drafts_with_head(model, config):  # the EAGLE chain drafter, with this run's draft length and rule
        drafter = EagleDrafter(model, shipped_eagle_head(model, config), config, rng)
        yield from draft_verify(model, prompt_ids, drafter, config, rng)
        return
    draft = load_draft_model(model, config.draft_model, any_tokenizer=True)
    check_bild(model, draft, config)
    if not same_vocabulary(model, draft):  # universal assisted decoding: drafts re-tokenised into target tokens
        yield from draft_verify(model, prompt_ids, UniversalDrafter(model, draft, config, rng), config, rng)
        return
    drafter = ModelDrafter(draft, config, rng, f"draft model {draft.info.model_id}", config.fallback_threshold,
                           shared=shares_weights(model, draft))
    acceptance = Rollback(config.rollback, config) if config.rollback else None  # None: exact
    yield from draft_verify(model, prompt_ids, drafter, config, rng, acceptance=acceptance)
