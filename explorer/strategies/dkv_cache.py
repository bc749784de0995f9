"""dKV-Cache-Greedy (Ma et al. 2025, "dKV-Cache: The Cache for Diffusion Language Models", arXiv:2505.15781; the
authors' code horseee/dKV-Cache, generation_utils/llada_dkv_cache_greedy.py: generate, find_window_tokens, and
models/modeling_llada_dkv_cache_greedy.py: LLaDALlamaBlock.forward). Its sibling dKV-Cache-Decode is the sampler's
`cache=dkv` (unmasking.py: Schedule.recompute).

Greedy caches aggressively, with a short lifespan: every position's K/V, masked ones included, is cached at a full
pass and reused until the next one; in between a step recomputes only the positions that matter to it. Notation
(the authors' LLaDA code; ours in brackets): cache_reloading_step R [`refresh`], window_size W [`window`],
n_k LLaDA's count at step k of a block.
1. When a block opens, its decoding order is drawn: a uniform draw per position, highest first (their x0_p =
   torch.rand, sorted; their code runs remasking='random' only); step k commits the next n_k positions in it.
2. Step k of a block (k = 0 when it opens) is a full pass, refreshing every K/V, when k % R == 0.
3. Otherwise it recomputes, on the cached K/V of every other position: the n_k positions it commits, those the
   step before committed (delayed caching: their token is now in), and for each position it commits, W masked
   positions around it not chosen yet, nearest first, left before right (find_window_tokens); their new K/V replace
   the cached ones.

Departures: the draws that fix the order are the sampler's random scores at the block's first step (recorded as
that step's confidences); a shorter last block and steps spread over blocks as in the sampler; a model that cannot
reuse canvas K/V (a masked LM, sliding-window attention) runs a full pass every step, with the same order and
commits (each step's rule says so); on a causal LM the canvas is read causally with the shift.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    kv_reuse_refusal,
    register_diffusion,
    transfer_counts,
)


@dataclass(frozen=True)
class DkvGreedyConfig(UnmaskingConfig):
    remasking: str = param("random", "the decoding order: random, drawn when a block opens (the authors' code runs "
                                     "only this)", choices=("random",))
    refresh: int = param(2, "R (cache_reloading_step): a full pass at every R-th step of a block (2: the authors' "
                            "example)", minimum=1, maximum=1024, step=1)
    window: int = param(4, "W (window_size): masked neighbours recomputed with each position being committed (4: "
                           "the authors' example)", minimum=0, maximum=64, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache != "none":
            raise ValueError("dKV-Cache-Greedy manages its own K/V reuse: leave cache=none")
        if self.threshold > 0:
            raise ValueError("dKV-Cache-Greedy commits a fixed count in a fixed order: leave threshold=0")
        if self.cfg_scale > 0:
            raise ValueError("classifier-free guidance runs a second canvas every step: not with dKV-Cache-Greedy")


def greedy_window(around: Sequence[int], masked: Sequence[bool], taken: set[int], size: int) -> list[int]:
    """find_window_tokens: for each position of `around` in turn, up to `size` masked positions not taken yet
    (`taken` and those found before), nearest first, the left one before the right one at equal distance."""
    taken, found = set(taken), []
    for centre in around:
        count = 0
        for distance in range(1, len(masked)):
            for position in (centre - distance, centre + distance):
                if count < size and 0 <= position < len(masked) and masked[position] and position not in taken:
                    taken.add(position)
                    found.append(position)
                    count += 1
            if count >= size:
                break
    return found


class DkvGreedySchedule(Schedule):
    def __init__(self, config: DkvGreedyConfig, model: Any = None, rng: torch.Generator | None = None):
        super().__init__(config, model, rng)
        # departure: where the model cannot reuse canvas K/V, every step is a full pass (said in each step's rule)
        self.reuses_kv = model is not None and kv_reuse_refusal(model) is None
        self.order: list[int] = []  # the open block's positions in their decoding order
        self.block_counts: list[int] = []

    def counts(self, masked: int, steps: int) -> list[int]:
        self.block_counts = transfer_counts(masked, steps)
        return self.block_counts

    def planned(self, block_step: int) -> int:
        """n_k as the sampler takes it: the block's count, one per step past its steps, at least one."""
        counts = self.block_counts
        return max(1, counts[block_step] if block_step < len(counts) else 1)

    def upcoming(self, masked: set[int], count: int) -> list[int]:
        """The next `count` positions of the block's order still masked."""
        return [p for p in self.order if p in masked][:count]

    def recompute(self, step: int, first: int, last: int | None, masked: torch.Tensor, committed_before: list[int],
                  *, block_step: int = 0) -> tuple[list[int], list[int] | None] | None:
        if block_step % self.config.refresh == 0:  # 2. a full pass (always when the block opens)
            return None
        flags = masked.tolist()
        upcoming = self.upcoming({p for p, flag in enumerate(flags) if flag}, self.planned(block_step))
        taken = set(upcoming) | set(committed_before)  # 3. this step's commits, the step before's (delayed)
        return sorted(taken | set(greedy_window(upcoming, flags, taken, self.config.window))), None

    def decide(self, view: StepView) -> Decision:
        if view.block_step == 0:  # 1. the block opens: its order, by this step's uniform draws, highest first
            rows = torch.nonzero(view.in_block).flatten()
            ranked = rows[torch.argsort(view.scores[rows], descending=True, stable=True)]
            self.order = view.positions[ranked].tolist()
        chosen = self.upcoming(set(view.positions.tolist()), view.count)
        committed = torch.isin(view.positions, torch.tensor(chosen, dtype=view.positions.dtype,
                                                            device=view.positions.device))
        rule = f"the next {view.count} in the block's random order"
        if not self.reuses_kv:
            rule += NO_REUSE_NOTE
        return Decision(committed, rule=rule)


register_diffusion("dkv_greedy", DkvGreedyConfig, "diffusion, dKV-Cache-Greedy: a random order; between refreshes "
                                                  "only the positions being decoded and a window around them",
                   paper="Ma et al. 2025, dKV-Cache, arXiv:2505.15781", schedule=DkvGreedySchedule,
                   reference_code=("horseee/dKV-Cache: generation_utils/llada_dkv_cache_greedy.py: generate, "
                                   "find_window_tokens"),
                   departures=(
                       "The uniform draws that fix a block's order are the sampler's random scores at the block's "
                       "first step (the authors draw torch.rand over the canvas once per block).",
                       "A canvas whose length is not a multiple of block_length gets a shorter last block, and steps "
                       "are spread over the blocks (the authors assert both divide).",
                       "A model that cannot reuse canvas K/V (a masked LM, sliding-window attention) runs a full pass "
                       "every step, with the same order and commits (each step's rule says so).",
                       "On a causal LM the canvas is read causally with a one-position shift; the paper runs "
                       "bidirectional diffusion LMs (LLaDA, Dream).",
                   ))
