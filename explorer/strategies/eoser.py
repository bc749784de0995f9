"""EOS Early Rejection and the Ascending Step-Size scheduler (Yang et al. 2025, "Taming Masked Diffusion Language
Models via Consistency Trajectory Reinforcement Learning with Fewer Decoding Step", arXiv:2509.23924).

EOSER: a masked diffusion LM decoding the whole canvas at once tends to fill it with end-of-sequence tokens
early; so a proposal that is EOS has its confidence scaled by γ(t) = γ_min + (γ_max − γ_min)·t, which grows with
the decoding progress t (strong rejection early, none at the end). With ASS, step i of a block commits 2^i
positions (1, 2, 4, ...: few while the context is thin, many once it is rich; the last step takes the rest), so a
canvas of L positions needs about log2(L) steps, and t = (2^(i+1) − 1) / 2^S over S steps; without it, LLaDA's
linear schedule with t = step / (steps − 1) (γ_min 0.4 there, 0.01 with ASS: the authors' defaults).

Departure: the authors' ASS also splits the canvas into power-of-two blocks; here the 2^i schedule runs inside
each of our blocks (one block, block_length 0, is their single-block case).

Authors' code: yjyddq/EOSER-ASS-RL eval/generate.py (eoser_generate, eoser_ass_generate, sampling, ass_sampling); in
the one-block setting the counts and γ(t) match. Further departures: without ASS, γ(t) runs over each block's steps
(the authors divide the block-local step by the total steps − 1, so with several blocks their γ never reaches
γ_max); every EOS id of the model is scaled (the authors: tokenizer.eos_token_id); the factor multiplies whatever
score `remasking` gives, while the authors scale the probability only (they assert low_confidence; random is
unscaled), so with remasking=entropy (scores −H ≤ 0) γ < 1 raises an EOS proposal's score instead of lowering it
(found in the fidelity review, a bug to fix); on a causal LM the canvas is read with the shift, and the caches need
a causal architecture with a KV cache (see diffusion.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from explorer.params import param
from explorer.strategies.unmasking import (
    CACHE_DEPARTURE,
    Decision,
    Schedule,
    StepView,
    UnmaskingConfig,
    commit_top,
    register_diffusion,
)


@dataclass(frozen=True)
class EoserConfig(UnmaskingConfig):
    block_length: int = param(0, "semi-autoregressive block length (0: one block, full-diffusion decoding, the "
                                 "paper's setting)", minimum=0, maximum=2048, step=1)
    ascending: bool = param(True, "ASS: step i commits 2^i positions (off: LLaDA's equal steps)")
    gamma_min: float = param(-1.0, "EOS confidence factor at the start (-1: 0.01 with ASS, 0.4 without)",
                             minimum=-1.0, maximum=1.0, step=0.01)
    gamma_max: float = param(1.0, "EOS confidence factor at the end", minimum=0.0, maximum=1.0, step=0.01)


def ascending_counts(masked: int) -> list[int]:
    """ASS: 1, 2, 4, ... positions per step, the last step taking what is left."""
    counts, left, size = [], masked, 1
    while left > 0:
        take = min(size, left)
        if left - take < size * 2 and left - take > 0:  # the rest would not fill the next step: take it now
            take = left
        counts.append(take)
        left -= take
        size *= 2
    return counts


def eos_factor(config: EoserConfig, block_step: int, block_steps: int) -> float:
    """γ(t) for this step of its block."""
    low = config.gamma_min if config.gamma_min >= 0 else (0.01 if config.ascending else 0.4)
    if block_steps <= 1:
        return config.gamma_max
    if config.ascending:
        progress = (2 ** (block_step + 1) - 1) / 2 ** block_steps
    else:
        progress = min(block_step, block_steps - 1) / (block_steps - 1)
    return low + (config.gamma_max - low) * min(1.0, progress)


class EoserSchedule(Schedule):
    def __init__(self, config: EoserConfig, model: Any = None, rng: torch.Generator | None = None):
        super().__init__(config, model, rng)
        self.eos_ids = model.eos_token_ids
        self.block_counts: list[int] = []

    def counts(self, masked: int, steps: int) -> list[int]:
        self.block_counts = ascending_counts(masked) if self.config.ascending else super().counts(masked, steps)
        return self.block_counts

    def decide(self, view: StepView) -> Decision:
        factor = eos_factor(self.config, view.block_step, len(self.block_counts))
        is_eos = torch.tensor([int(t) in self.eos_ids for t in view.proposals.tolist()], dtype=torch.bool,
                              device=view.scores.device)
        scores = torch.where(is_eos, view.scores * factor, view.scores)
        committed = commit_top(scores, view.in_block, view.count)
        return Decision(committed, scores=[round(float(s), 6) for s in scores],
                        rule=f"the {view.count} best by {self.config.remasking}, EOS scaled by γ = {factor:.2f}")


register_diffusion("eoser", EoserConfig, "diffusion: reject early EOS, commit 1, 2, 4, ... tokens per step",
                   paper="Yang et al. 2025, EOSER and ASS, arXiv:2509.23924", schedule=EoserSchedule,
                   reference_code=("yjyddq/EOSER-ASS-RL: eval/generate.py: eoser_generate, eoser_ass_generate, "
                                   "sampling, ass_sampling"),
                   departures=(
                       "ASS: the authors also cut the canvas into power-of-two blocks (block_num, gen_length = 2^S); "
                       "here 1, 2, 4, ... runs inside each of our blocks, for any length (block_length 0 = their "
                       "one-block case).",
                       "review finding, not fixed: "
                       "the EOS factor multiplies whatever score remasking gives; with remasking=entropy the "
                       "scores are −H ≤ 0, so γ < 1 raises an EOS proposal's score (promotes EOS), and random scores "
                       "are scaled too; the authors scale the probability only (low_confidence asserted).",
                       "Without ASS, γ(t) runs from γ_min to γ_max over each block's steps; the authors' "
                       "eoser_generate divides the block-local step by the total steps − 1, so with several blocks "
                       "their γ never reaches γ_max.",
                       "Every EOS id of the model is scaled (end-of-turn too); the authors scale "
                       "tokenizer.eos_token_id only.",
                       "Without ASS: a shorter last block when the canvas is not a multiple of block_length, and steps "
                       "spread over the blocks (the authors assert both divide).",
                       "On a causal LM the canvas is read causally with a one-position shift; the paper runs "
                       "bidirectional diffusion LMs (LLaDA).",
                       CACHE_DEPARTURE,
                   ))
