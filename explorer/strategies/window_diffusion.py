"""Window-Diffusion (METHODS F07: "a local window slides rightward as denoising proceeds; undecoded tokens are
active (computed), buffer (K/V cached, periodically refreshed) or far-field (pruned)").

At each step the masked positions are split, left to right, into the active window (the first W: recomputed,
and the only ones that may be committed), the buffer (the next B: their K/V reused from when they were last
computed, recomputed every R steps) and the far field (the rest: left out of the pass entirely). Committed
positions are recomputed once, the step after their token is in (their K/V then holds the token), and reused
from then on. Inside the window, Fast-dLLM's threshold rule commits (at least one position per step), so the
window slides as its left end is decoded. A pass therefore costs about W + (refresh) B + newly committed
positions instead of the whole canvas.

Departure: the paper was not among the sources we could read; this follows its abstract's three zones, with
the delayed caching of committed tokens taken from dKV-Cache; on a causal model the far field cannot matter to
the window anyway (it lies to its right).

The authors' code (vhicrgit/Window-Diffusion, arXiv:2601.20332; llada/model/modeling_llada.py: generate) differs,
and this module does not follow it (a fix to come): every refresh_cycle steps a phase opens with a full pass over
the whole canvas (far field included) that refreshes every K/V and commits LLaDA's fixed count, top-k over all
masked positions; inside the phase only the active tokens (the first active_tokens masked, plus those committed in
the phase, which stay active) are recomputed, attending to the prompt, the decoded tokens and the first
window_tokens masked positions as cached at the phase's start, and each step commits the fixed count among them.
We never recompute the far field after the first pass, refresh only the buffer, recompute a committed position
once, and commit by Fast-dLLM's threshold. With block_length > 0 the window is still the canvas's first W masked
positions, so positions outside the open block get committed (a bug). The authors' code has no blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from explorer.params import param
from explorer.strategies.unmasking import (
    Decision,
    Schedule,
    StepView,
    UnmaskingConfig,
    commit_above,
    commit_top,
    diffusion_prepare,
    register_diffusion,
)


@dataclass(frozen=True)
class WindowConfig(UnmaskingConfig):
    block_length: int = param(0, "semi-autoregressive blocks (0: none, the window slides over the whole canvas)",
                              minimum=0, maximum=2048, step=1)
    threshold: float = param(0.9, "commit every active position scoring at least this (at least one; 0: one per "
                                  "step)", minimum=0.0, maximum=1.0, step=0.01)
    window: int = param(16, "W: masked positions recomputed and eligible each step", minimum=1, maximum=512, step=1)
    buffer: int = param(32, "B: the masked positions after the window whose K/V are reused", minimum=0,
                        maximum=2048, step=1)
    refresh: int = param(4, "recompute the buffer every this many steps (0: never after the first pass)", minimum=0,
                         maximum=1024, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache != "none":
            raise ValueError("Window-Diffusion manages its own K/V reuse: leave cache=none")
        if self.cfg_scale > 0:
            raise ValueError("classifier-free guidance runs a second canvas every step: not with Window-Diffusion")


def zones(masked: torch.Tensor, window: int, buffer: int) -> tuple[list[int], list[int], list[int]]:
    """(active, buffer, far field) masked positions, left to right."""
    positions = torch.nonzero(masked).flatten().tolist()
    return positions[:window], positions[window:window + buffer], positions[window + buffer:]


class WindowSchedule(Schedule):
    reuses_kv = True

    def recompute(self, step: int, first: int, last: int | None, masked: torch.Tensor, committed_before: list[int]
                  ) -> tuple[list[int], list[int] | None] | None:
        config = self.config
        active, buffer, _ = zones(masked, config.window, config.buffer)
        refreshing = config.refresh and step % config.refresh == 0
        compute = sorted(set(active) | set(committed_before) | (set(buffer) if refreshing else set()))
        decoded = torch.nonzero(~masked).flatten().tolist()
        reuse = sorted((set(decoded) | set(buffer)) - set(compute))
        return compute, reuse

    def decide(self, view: StepView) -> Decision:
        config = self.config
        active = torch.zeros_like(view.in_block)
        active[:config.window] = True  # rows are the masked positions, ascending: the first W are the window
        if config.threshold > 0:
            committed = commit_above(view.scores, active, config.threshold)
            rule = f"window of {config.window}: score ≥ {config.threshold:g} (at least one)"
        else:
            committed = commit_top(view.scores, active, 1)
            rule = f"window of {config.window}: the best by {config.remasking}"
        return Decision(committed, rule=rule)


def window_prepare(model: Any, config: WindowConfig) -> None:
    from explorer.models import CanvasKV

    diffusion_prepare(model, config)
    CanvasKV.check(model)


register_diffusion("window_diffusion", WindowConfig, "diffusion: a sliding window of active positions, a cached "
                                                     "buffer, the far field pruned",
                   paper="Window-Diffusion, arXiv:2601.20332 (METHODS F07)", schedule=WindowSchedule,
                   prepare=window_prepare,
                   reference_code="vhicrgit/Window-Diffusion: llada/model/modeling_llada.py: generate",
                   departures=(
                       "WRONG: with block_length > 0 the window is the first W masked positions of the whole canvas, "
                       "so it commits positions outside the open block.",
                       "WRONG: does not follow the authors' code, which opens every refresh_cycle-step phase with a "
                       "full pass over the whole canvas (all K/V refreshed, far field included) and commits LLaDA's "
                       "fixed count per step; ours never recomputes the far field after step 0, refreshes only the "
                       "buffer, and commits by Fast-dLLM's threshold.",
                       "Positions committed inside a phase stay active (recomputed every step) until the next refresh "
                       "in the authors' code; ours recomputes them once, the step after (dKV-Cache's delayed caching).",
                       "Defaults W 16, B 32 (a 48-position window), refresh 4 are ours; the authors' LLaDA demo uses "
                       "active_tokens 16, window_tokens 64, refresh_cycle 32 (Dream: 32, 128, 32).",
                       "Runs only on causal LMs (K/V reuse; the canvas read with a one-position shift), where the far "
                       "field, right of the window, cannot affect it; the method is for bidirectional diffusion LMs "
                       "(LLaDA, Dream), where pruning it is an approximation.",
                   ))
