"""DEL: dynamic exit layer for early-exit self-speculative decoding (Entezari Zarch, Gao, Jiang, Annavaram 2025,
"DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative Decoding", arXiv:2504.05598).

Notation: L = layers, l = exit layer (the draft runs layers 1..l, then the final norm and LM head), d = draft
length (speculation length), alpha_l = the estimated chance that a token drafted at exit l is accepted.
1. Shadow tokens: the verification pass returns every layer's hidden states; at each verified position up to
   the first mismatch (the rows whose token the target committed), the shadow token of layer l is
   argmax head(norm(h_l)): the token an exit at l would have drafted. alpha_l is the share of shadow tokens
   equal to the target's, over the candidate exits. Departure (ours; the authors' code, hoenza/DEL, could not be
   read here): the estimate is a running average with weight `decay` (0.7) on the past, and the prompt's last
   PROMPT_POSITIONS positions (the prefill) give the first estimate, so it is context-aware from round one.
2. Choose the exit and length that maximise tokens per layer,
   TPL(l, d) = [(1 - alpha_l^(d+1)) / (1 - alpha_l)] / (d l + L)
   (expected tokens a round yields over the layers it runs: d draft passes of l layers, one verification of L).
3. Draft up to d tokens at exit l on the target's own KV cache; dynamic draft exiting: stop early when the
   exit's top probability falls below `confidence`. Verify (greedy rule: token-identical to greedy; sampling
   rule: exactly p).
Departures: candidate exits are every `stride`-th layer (the shadow LM head over every layer at every verified
position would cost several full passes per round on a CPU); the paper adapts the draft-exit confidence
threshold per layer, ours is fixed; at least one token is drafted per round so alpha keeps being measured.
Without early-exit training (LayerSkip's models), early exits of an ordinary model agree rarely: DEL then picks
deep exits and short drafts, which is the behaviour to watch here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.models import final_norm
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_models import ChainDraftConfig, EarlyExitDrafter, early_exit_prepare
from explorer.strategies.draft_verify import DraftTree, Verdict, draft_verify

PROMPT_POSITIONS = 16  # prompt positions whose shadow tokens seed alpha


@dataclass(frozen=True)
class DelConfig(ChainDraftConfig):
    draft_length: int = param(6, "longest draft d", minimum=1, maximum=16, step=1)
    stride: int = param(0, "candidate exits every this many layers (0: about eight candidates)", minimum=0,
                        maximum=64, step=1)
    decay: float = param(0.7, "running-average weight on past acceptance estimates (ours, not the paper's)",
                         minimum=0.0, maximum=0.99, step=0.01)
    confidence: float = param(0.3, "dynamic draft exiting: stop drafting when the exit's top probability is below "
                                   "this (0 = off)", minimum=0.0, maximum=0.99, step=0.01)


def tokens_per_layer(alpha: float, draft_length: int, exit_layer: int, layers: int) -> float:
    """TPL(l, d): expected tokens per round, (1 - a^(d+1)) / (1 - a), over layers run, d l + L."""
    alpha = min(max(alpha, 0.0), 0.999999)
    return (1.0 - alpha ** (draft_length + 1)) / (1.0 - alpha) / (draft_length * exit_layer + layers)


def best_exit(alphas: dict[int, float], max_length: int, layers: int) -> tuple[int, int, float]:
    """(exit layer, draft length, TPL) maximising TPL over the candidates and d = 1..max_length."""
    return max(((exit_layer, d, tokens_per_layer(alpha, d, exit_layer, layers))
                for exit_layer, alpha in sorted(alphas.items()) for d in range(1, max_length + 1)),
               key=lambda choice: (choice[2], -choice[0]))


class DelDrafter(EarlyExitDrafter):
    name = "DEL (dynamic exit layer)"
    wants_hidden_states = True  # shadow tokens come from the verification pass's hidden states
    wants_prefill_hidden_states = True  # the prompt seeds alpha

    def __init__(self, model: Any, config: DelConfig, rng: torch.Generator):
        super().__init__(model, config, rng, confidence=config.confidence)
        layers = self.total
        stride = config.stride or max(1, layers // 8)
        self.candidates = list(range(stride, layers, stride)) or [max(1, layers - 1)]
        self.alphas = {layer: 0.5 for layer in self.candidates}  # before any evidence
        self.seen = False
        self.decay = config.decay
        self.norm, self.head = final_norm(model.model), model.model.get_output_embeddings()
        self.choice = best_exit(self.alphas, config.draft_length, layers)
        self.drafted: list[int] = []

    def depths(self) -> list[int]:
        exit_layer, length, _ = self.choice
        return [exit_layer] * length

    def propose(self, context: Sequence[int]) -> DraftTree:
        draft = super().propose(context)
        self.drafted = list(draft.tokens)
        return draft

    @torch.inference_mode()
    def shadow_matches(self, hidden: torch.Tensor, targets: Sequence[int]) -> dict[int, float]:
        """Step 1: per candidate exit, the share of positions whose shadow token equals the target's.
        `hidden`: (L + 1, positions, hidden), hidden[l] = the output of layer l."""
        states = torch.stack([hidden[layer] for layer in self.candidates])  # (candidates, positions, hidden)
        shadow = self.head(self.norm(states)).argmax(dim=-1)  # (candidates, positions)
        wanted = torch.as_tensor(list(targets), device=shadow.device)
        return dict(zip(self.candidates, (shadow == wanted).float().mean(dim=-1).tolist(), strict=True))

    def update(self, matches: dict[int, float]) -> None:
        # Departure (ours): an exponential running average, weight `decay` on the past
        for layer, rate in matches.items():
            self.alphas[layer] = rate if not self.seen else self.decay * self.alphas[layer] + (1 - self.decay) * rate
        self.seen = True
        self.choice = best_exit(self.alphas, self.config.draft_length, self.total)  # step 2

    def observe_prefill(self, inputs: Sequence[int], logits: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """The prompt seeds alpha: shadow tokens at its last positions against the target's own predictions.
        Departure (ours: not in the paper's text we could read, nor checked against the authors' code)."""
        tail = min(PROMPT_POSITIONS, len(inputs))
        self.update(self.shadow_matches(hidden_states[:, -tail:], logits[-tail:].argmax(dim=-1).tolist()))

    def observe(self, verdict: Verdict) -> None:
        if verdict.hidden_states is None:
            return
        rows = verdict.accepted_count + 1  # the committed positions: accepted drafts and the bonus
        committed = [*self.drafted[:verdict.accepted_count], verdict.bonus_token]
        self.update(self.shadow_matches(verdict.hidden_states[:, :rows], committed))

    def round_details(self) -> dict[str, float | str]:
        exit_layer, length, tpl = self.choice
        return {"exit_layer": float(self.drafted_depths[0] if self.drafted_depths else exit_layer),
                "planned_length": float(length), "tokens_per_layer": tpl,
                "layer_acceptance": ",".join(f"{self.alphas[layer]:.3f}" for layer in self.candidates),
                "candidate_exits": ",".join(str(layer) for layer in self.candidates)}


@register("del", DelConfig, "DEL: early-exit self-speculation choosing exit layer and draft length per round",
          prepare=early_exit_prepare, family="speed-up: draft-verify",
          paper="Entezari Zarch et al. 2025, DEL, arXiv:2504.05598",
          reference_code="hoenza/DEL: (linked from the paper; no copy could be read here, so not checked)",
          departures=(
              "alpha_l is a running average with weight decay = 0.7 on the past: ours, not checked against the "
              "authors' code",
              "the prompt's last 16 positions seed alpha_l (shadow tokens of the prefill against the target's own "
              "argmax): ours, not checked against the authors' code",
              "candidate exits every stride-th layer, not every layer (the shadow LM head over all layers costs "
              "several full passes per round on a CPU)",
              "the draft-exit confidence threshold is one fixed value; the paper adapts it per layer",
              "at least one token is drafted per round, so alpha keeps being measured",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: DelConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, DelDrafter(model, config, rng), config, rng)
