"""Jacobi decoding (Santilli et al. 2023, "Accelerating Transformer Inference for Translation via Parallel
Decoding", arXiv:2305.10427).

Greedy decoding is the fixed point of y_i = argmax p(. | x, y_<i) for all i of a window at once. Each Jacobi
iteration feeds the current guesses y^(k)_1..W through the model in one pass and takes
y^(k+1)_i = argmax p(. | x, y^(k)_<i) for every position; positions whose guess is confirmed by the ones
before it have converged and are committed. Written as draft-verify: the draft of iteration k+1 is the
target's argmax from iteration k (shifted past what was committed), and the committed prefix is exactly the
greedy acceptance of that draft, so the output equals greedy decoding. The window starts (and is refilled)
with copies of the last token (the paper initialises with padding).
Each DraftRound is one iteration: its draft tokens are the window's row of the iteration x position grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_verify import Drafter, DraftTree, SpeculativeConfig, Verdict, draft_verify


@dataclass(frozen=True)
class JacobiConfig(SpeculativeConfig):
    window: int = param(8, "number of future positions iterated in parallel", minimum=1, maximum=32, step=1)


class JacobiDrafter(Drafter):
    name = "jacobi"

    def __init__(self, window: int):
        self.window = window
        self.guesses: list[int] = []
        self.iteration = 0

    def propose(self, context: Sequence[int]) -> DraftTree:
        guesses = self.guesses[: self.window]
        filler = guesses[-1] if guesses else context[-1]
        guesses += [filler] * (self.window - len(guesses))
        return DraftTree.chain(guesses, iteration=float(self.iteration))

    def observe(self, verdict: Verdict) -> None:
        # y^(k+1): the target's argmax at every window position past the committed bonus token.
        self.guesses = verdict.target_argmax[verdict.accepted_count + 1:]
        self.iteration += 1


@register("jacobi", JacobiConfig, "Jacobi decoding: fixed-point iteration over a window of future tokens",
          family="speed-up: model-free",
          paper="Santilli et al. 2023, arXiv:2305.10427")
def run(model: Any, prompt_ids: Sequence[int], config: JacobiConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, JacobiDrafter(config.window), config, rng)
