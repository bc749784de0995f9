"""Window-Diffusion (arXiv:2601.20332; the authors' code vhicrgit/Window-Diffusion, llada/model/modeling_llada.py:
generate, build_window_plan, update_window_plan, llada_forward_prune): a training-free window over the masked
positions that slides rightward as they are decoded, with phase-level K/V caching.

Notation (the authors' LLaDA code; ours in brackets): active_tokens W [`window`], window_tokens W + B
[`window` + `buffer`], refresh_cycle R [`refresh`], the phase length. Decoding runs in phases of R steps:
1. A phase opens (steps 0, R, 2R, ...) with a full pass over the whole canvas that refreshes every position's K/V,
   and commits LLaDA's fixed count n_k of the masked positions, the most confident first.
2. The zones, fixed when the phase opens (after that commit), left to right over the masked positions: the active
   zone (the first W), the buffer (the next B: their K/V from the opening pass, reused), the far field (the rest:
   pruned, left out of every pass of the phase). The window is the decoded positions and the active and buffer
   zones.
3. Each further step of the phase recomputes only the active tokens: the first W masked positions now, those
   committed at steps of the phase, and, for one step, those the opening committed (then cached); they attend to
   the window's K/V (the active ones fresh) and n_k of their masked positions are committed, the most confident
   first. The window does not move within a phase; the active zone does.
So a step costs W + the phase's commits positions against W + B + the decoded ones, instead of the whole canvas.
The authors' Dream version (dream/model/generation_utils.py: nearest_sample_fast_v2_cache) differs (it prunes the
far field at a phase's opening pass too, and commits there the first masked position); we follow the LLaDA code.

Departures, marked where they happen: with `block_length` > 0 only active positions inside the open block are
eligible (the authors' code has no blocks; the phases count the run's steps, not a block's), and n_k is each
block's share of LLaDA's count; `threshold` > 0 (off by default) commits by Fast-dLLM's rule inside the active zone
instead of the fixed count; a model that cannot reuse canvas K/V (a masked LM such as ModernBERT, a model with
sliding windows) runs a full pass every step (the zones still decide what may commit; nothing is pruned), and each
step's record says so; on a causal LM the canvas is read causally with the shift, so the far field, right of the
window, cannot matter to it anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from explorer.params import param
from explorer.strategies.unmasking import (
    NO_REUSE_NOTE,
    Decision,
    Schedule,
    StepView,
    UnmaskingConfig,
    commit_above,
    commit_top,
    kv_reuse_refusal,
    register_diffusion,
)


@dataclass(frozen=True)
class WindowConfig(UnmaskingConfig):
    block_length: int = param(0, "semi-autoregressive blocks (0: none, the window slides over the whole canvas, as "
                                 "in the authors' code)", minimum=0, maximum=2048, step=1)
    threshold: float = param(0.0, "0: LLaDA's fixed count per step (the authors'); > 0: commit every active "
                                  "position scoring at least this (at least one)", minimum=0.0, maximum=1.0, step=0.01)
    window: int = param(16, "W (active_tokens): the masked positions recomputed and eligible each step",
                        minimum=1, maximum=512, step=1)
    buffer: int = param(48, "B: the masked positions after the active zone whose K/V a phase reuses "
                            "(window_tokens = W + B)", minimum=0, maximum=2048, step=1)
    refresh: int = param(32, "R (refresh_cycle): steps per phase; each phase opens with a full pass", minimum=1,
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
    def __init__(self, config: WindowConfig, model: Any = None, rng: torch.Generator | None = None):
        super().__init__(config, model, rng)
        # departure: where the model cannot reuse canvas K/V, every step is a full pass (said in each step's rule)
        self.reuses_kv = model is not None and kv_reuse_refusal(model) is None
        self.window_masked: set[int] = set()  # the active and buffer zones as the phase opened
        self.phase_commits: set[int] = set()  # committed at the phase's steps after its opening: they stay active

    def opens_phase(self, step: int) -> bool:
        return step % self.config.refresh == 0

    def recompute(self, step: int, first: int, last: int | None, masked: torch.Tensor, committed_before: list[int],
                  *, block_step: int = 0) -> tuple[list[int], list[int] | None] | None:
        config = self.config
        if self.opens_phase(step):  # 1. the phase's full pass: every K/V refreshed, far field included
            return None
        active, buffer, _ = zones(masked, config.window, config.buffer)
        if self.opens_phase(step - 1):  # 2. the zones, after the opening's commit (build_window_plan)
            self.window_masked, self.phase_commits = set(active) | set(buffer), set()
        else:  # update_window_plan: what the phase commits stays active until the phase ends
            self.phase_commits |= set(committed_before)
        # 3. recomputed: the active zone, the phase's commits, and the step before's (the opening's, once)
        compute = set(active) | self.phase_commits | set(committed_before)
        decoded = set(torch.nonzero(~masked).flatten().tolist())
        return sorted(compute), sorted((decoded | self.window_masked) - compute)  # the rest is pruned

    def decide(self, view: StepView) -> Decision:
        config = self.config
        eligible = view.in_block.clone()  # departure: only the open block commits (the authors have no blocks)
        opening = self.opens_phase(view.step)
        if not opening:
            eligible[config.window:] = False  # rows are the masked positions, ascending: the first W are active
        where = "the block" if opening else f"the active {config.window}"
        if config.threshold > 0:  # departure: Fast-dLLM's rule, an option the authors do not have
            committed = commit_above(view.scores, eligible, config.threshold)
            rule = f"{where}: score ≥ {config.threshold:g} (at least one)"
        else:
            committed = commit_top(view.scores, eligible, view.count)
            rule = f"{where}: the {view.count} best by {config.remasking}"
        if opening:
            rule = f"phase opens (full pass): {rule}"
        elif not self.reuses_kv:
            rule += NO_REUSE_NOTE
        return Decision(committed, rule=rule)


register_diffusion("window_diffusion", WindowConfig, "diffusion: a sliding window of active positions, a cached "
                                                     "buffer, the far field pruned, a full refresh per phase",
                   paper="Window-Diffusion, arXiv:2601.20332", schedule=WindowSchedule,
                   reference_code=("vhicrgit/Window-Diffusion: llada/model/modeling_llada.py: generate, "
                                   "build_window_plan, update_window_plan"),
                   departures=(
                       "With block_length > 0 (default 0, as the authors) only active positions inside the open block "
                       "may commit, and each block gets its share of LLaDA's count; the authors' code has no blocks. "
                       "Phases count the run's steps.",
                       "threshold > 0 (default 0) commits by Fast-dLLM's rule inside the active zone, an option the "
                       "authors' code does not have.",
                       "A model that cannot reuse canvas K/V (a masked LM such as ModernBERT, sliding-window "
                       "attention) runs a full pass every step: the zones decide what may commit, nothing is pruned "
                       "(each step's rule says so).",
                       "On a causal LM the canvas is read causally with a one-position shift, so the far field, right "
                       "of the window, cannot affect it; the method is for bidirectional diffusion LMs (LLaDA, Dream), "
                       "where pruning it is an approximation.",
                   ))
