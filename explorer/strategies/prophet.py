"""Prophet (Li et al. 2025, "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982).

Early-commit decoding: at every step, the gap between the top-2 logits, g_i = L_i^(1) − L_i^(2), is averaged
over the monitored positions; when ḡ ≥ τ(progress) the sampler goes "all-in" and commits every remaining masked
position at once with this step's prediction x̂ (the plain argmax at temperature 0, the argmax of the
Gumbel-noised logits at temperature > 0: the very x̂ a normal step commits, as the authors' `generate` fills the
remaining masks with its x0); otherwise the step follows the base rule (LLaDA's low-confidence remasking, or
Fast-dLLM's threshold). τ falls with the progress of decoding: τ_high for the first third of the planned steps,
τ_mid for the second, τ_low for the last (the authors' defaults 7.5 / 5.0 / 2.5).

Departures (see `departures` below): the authors monitor the answer span (a known answer position, e.g. after
"The answer is"); with no answer span in a general prompt, we monitor the masked positions of the current block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from explorer.params import param
from explorer.strategies.unmasking import Decision, Schedule, StepView, UnmaskingConfig, register_diffusion


@dataclass(frozen=True)
class ProphetConfig(UnmaskingConfig):
    tau_high: float = param(7.5, "logit gap that triggers all-in in the first third of the steps", minimum=0.0,
                            maximum=50.0, step=0.5)
    tau_mid: float = param(5.0, "... in the second third", minimum=0.0, maximum=50.0, step=0.5)
    tau_low: float = param(2.5, "... in the last third", minimum=0.0, maximum=50.0, step=0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tau_high >= self.tau_mid >= self.tau_low:
            raise ValueError("Prophet's thresholds fall as decoding goes on: need tau_high ≥ tau_mid ≥ tau_low")


def logit_gaps(logits: torch.Tensor) -> torch.Tensor:
    """g_i = L^(1) − L^(2) per row of `logits` (n, vocab)."""
    top2 = torch.topk(logits.float(), 2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def gap_threshold(config: ProphetConfig, progress: float) -> float:
    """τ(progress): high, mid, low by thirds of the planned steps."""
    return config.tau_high if progress < 1 / 3 else config.tau_mid if progress < 2 / 3 else config.tau_low


class ProphetSchedule(Schedule):
    def decide(self, view: StepView) -> Decision:
        gaps = logit_gaps(view.logits)
        monitored = gaps[view.in_block]
        mean_gap = float(monitored.mean()) if monitored.numel() else 0.0
        tau = gap_threshold(self.config, view.progress)
        if mean_gap >= tau:  # all-in: every remaining position, each with this step's x̂ (noised if T > 0)
            return Decision(torch.ones_like(view.in_block), scores=[round(float(g), 4) for g in gaps], all_in=True,
                            rule=f"all-in: mean top-2 logit gap {mean_gap:.2f} ≥ τ = {tau:g}")
        base = super().decide(view)
        return Decision(base.committed, scores=[round(float(g), 4) for g in gaps],
                        rule=f"{base.rule} (gap {mean_gap:.2f} < τ = {tau:g})")


register_diffusion("prophet", ProphetConfig, "diffusion, early commit: all-in once the top-2 logit gap is wide",
                   paper="Li et al. 2025, Diffusion Language Models Know the Answer Before Decoding, "
                         "arXiv:2508.19982", schedule=ProphetSchedule,
                   reference_code="pixeli99/Prophet: generate_earlyexit.py: generate, should_early_exit",
                   departures=(
                       "the gap is averaged over the masked positions of the current block, not over a known answer "
                       "span (the authors force 'The answer is' at fixed positions and watch the 5 after it)",
                       "the phases are thirds of steps done / planned counted from 0; the authors' code cuts at "
                       "progress 0.33 and 0.67 with progress = (step + 1) / steps",
                   ))
