"""Jacobi decoding (Santilli et al. 2023, "Accelerating Transformer Inference for Translation via Parallel
Decoding", arXiv:2305.10427).

Greedy decoding is the fixed point of y_i = argmax p(. | x, y_<i) for all i of a window at once. Each Jacobi
iteration feeds the current guesses y^(k)_1..W through the model in one pass and takes
y^(k+1)_i = argmax p(. | x, y^(k)_<i) for every position; positions whose guess is confirmed by the ones
before it have converged and are committed. Written as draft-verify: the draft of iteration k+1 is the
target's argmax from iteration k (shifted past what was committed), and the committed prefix is exactly the
greedy acceptance of that draft, so the output equals greedy decoding.

Variants (`variant`):
- "sliding" (default here; the window of Lookahead and CLLM): W positions are iterated; after each iteration the
  converged prefix is committed and the window is refilled to W positions.
- "blocks": the paper's GS-Jacobi (Gauss-Seidel across blocks, Jacobi within one): the output is cut into blocks
  of b = W positions; a block is iterated until every position in it has converged, and only then does the
  next block start. Departure: the paper commits a block when an iteration leaves it unchanged (one extra pass
  to see that); we commit each position as soon as the iterations before it prove it converged (the greedy
  acceptance), which commits the same tokens without the checking pass.
New positions start as `init`: "pad" (the paper's initialisation: the tokenizer's padding token, or EOS when it
has none) or "copy" (copies of the last token).
Each DraftRound is one iteration: its draft tokens are the window's row of the iteration x position grid.

Authors' code: teelinsan/parallel-decoding src/ipi/decoders/jacobi.py (JacobiDecoder.decode) and gs_jacobi.py
(GSJacobiDecoder.decode), greedy, on encoder-decoder translation models. Their Jacobi iterates the whole output at
once (its length taken from the greedy output) until an iteration changes nothing; the default "sliding" window
here is not the paper's (departure), and the sampling rule (the guesses verified by speculative sampling) is ours.
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

VARIANTS = ("sliding", "blocks")
INITS = ("pad", "copy")


@dataclass(frozen=True)
class JacobiConfig(SpeculativeConfig):
    window: int = param(8, "number of future positions iterated in parallel (the block size b for blocks)",
                        minimum=1, maximum=32, step=1)
    variant: str = param("sliding", "sliding: refill the window after every iteration; blocks: the paper's "
                                    "GS-Jacobi, one block at a time", choices=VARIANTS)
    init: str = param("pad", "new positions start as the padding token (the paper's) or a copy of the last token",
                      choices=INITS)


class JacobiDrafter(Drafter):
    name = "jacobi"

    def __init__(self, config: JacobiConfig, pad_id: int):
        self.window, self.blocks, self.pad_id = config.window, config.variant == "blocks", pad_id
        self.copy = config.init == "copy"
        self.guesses: list[int] = []
        self.iteration = 0
        self.block_left = config.window  # blocks: positions of the current block not yet committed
        self.block = 0

    def propose(self, context: Sequence[int]) -> DraftTree:
        size = self.block_left if self.blocks else self.window
        guesses = self.guesses[:size]
        filler = (guesses[-1] if guesses else context[-1]) if self.copy else self.pad_id
        guesses += [filler] * (size - len(guesses))
        return DraftTree.chain(guesses, iteration=float(self.iteration), block=float(self.block))

    def observe(self, verdict: Verdict) -> None:
        # y^(k+1): the target's argmax at every window position past the committed bonus token.
        self.guesses = verdict.target_argmax[verdict.accepted_count + 1:]
        self.iteration += 1
        if self.blocks:
            self.block_left -= verdict.accepted_count + 1
            if self.block_left <= 0:  # the block is done: the next one starts (its first token may be committed)
                self.block_left += self.window
                self.block += 1
                self.guesses = []  # a new block starts from its initialisation


@register("jacobi", JacobiConfig, "Jacobi decoding: fixed-point iteration over a window of future tokens",
          family="speed-up: model-free",
          paper="Santilli et al. 2023, arXiv:2305.10427",
          reference_code=("teelinsan/parallel-decoding: src/ipi/decoders/jacobi.py: JacobiDecoder.decode; "
                          "src/ipi/decoders/gs_jacobi.py: GSJacobiDecoder.decode"),
          departures=(
              "The default variant 'sliding' (a W = 8 window refilled after each iteration, as Lookahead and CLLM "
              "use) is not the paper's; its Jacobi iterates the whole output, of a length taken from the greedy "
              "output, at once.",
              "blocks (GS-Jacobi) commits each position as soon as the iterations before it prove it converged; the "
              "paper commits a block when an iteration leaves it unchanged (one extra pass).",
              "The sampling rule (the guesses verified by speculative sampling) is ours; the paper is greedy only.",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: JacobiConfig, rng: torch.Generator) -> Iterator[Event]:
    pad = getattr(model.tokenizer, "pad_token_id", None)
    pad_id = pad if isinstance(pad, int) else min(model.eos_token_ids, default=0)
    yield from draft_verify(model, prompt_ids, JacobiDrafter(config, pad_id), config, rng)
