"""Lookahead decoding (Fu, Bailis, Stoica, Zhang 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding", arXiv:2402.02057).

Notation: W = lookahead window, N = n-gram size, G = guesses verified per step.
Each step is one target pass over a tree with two kinds of branches hanging off the last committed token:
  - the lookahead branch: a Jacobi window of W guesses; the pass yields new guesses o_j for every window
    position (the Jacobi update), and each stretch of N - 1 window tokens followed by the new guess after it,
    (w_j, ..., w_(j+N-2), o_(j+N-1)), is an n-gram the model finds plausible: it goes into the pool, keyed by
    its first token;
  - the verification branch: up to G n-grams from the pool whose first token is the last committed token
    continues, each a chain of N - 1 tokens.
The target verifies every branch at once (greedy rule: the longest branch prefix equal to its argmax; sampling
rule: exact recursive rejection over the deterministic candidates); the window then moves past what was
committed. The output equals greedy decoding under the greedy rule.
Departure: the paper keeps N - 1 past levels of the window (a 2-D window) and reads n-grams off its
diagonals; we keep one level, so each n-gram's first N - 1 tokens come from the previous iteration and its
last from the current one. The window starts as the last W context tokens (the paper: random tokens).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, PoolUpdate
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_verify import Drafter, DraftTree, SpeculativeConfig, Verdict, draft_verify

POOL_PER_HEAD = 16


@dataclass(frozen=True)
class LookaheadConfig(SpeculativeConfig):
    window: int = param(5, "Jacobi window W", minimum=1, maximum=32, step=1)
    ngram: int = param(3, "n-gram size N (>= 2)", minimum=2, maximum=8, step=1)
    guesses: int = param(3, "n-grams verified per step G", minimum=0, maximum=16, step=1)

    def draft_nodes(self) -> int:
        """The window and G n-grams of N - 1 tokens."""
        return self.window + self.guesses * (self.ngram - 1)


class LookaheadDrafter(Drafter):
    name = "lookahead"

    def __init__(self, config: LookaheadConfig):
        self.w, self.n, self.g = config.window, config.ngram, config.guesses
        self.window: list[int] = []
        self.pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}  # head -> continuations, newest last
        self._added: list[tuple[int, tuple[int, ...]]] = []
        self._last_window: list[int] = []

    def propose(self, context: Sequence[int]) -> DraftTree:
        if not self.window:
            self.window = list(context[-self.w:])
        window = (self.window + [self.window[-1]] * self.w)[: self.w]
        tokens, parents = list(window), list(range(-1, self.w - 1))  # the lookahead branch: one chain
        guesses = list(reversed(self.pool.get(context[-1], {})))[: self.g]
        for guess in guesses:  # the verification branch: one chain per n-gram
            for i, token in enumerate(guess):
                parents.append(-1 if i == 0 else len(tokens) - 1)
                tokens.append(token)
        self._last_window = window
        tree = DraftTree(tokens, parents, [1.0] * len(tokens), None, mode="point")
        tree.details.update(window=float(self.w), guesses=float(len(guesses)), pool=float(self.pool_size))
        return tree

    @property
    def pool_size(self) -> int:
        return sum(len(v) for v in self.pool.values())

    def observe(self, verdict: Verdict) -> None:
        window = self._last_window
        outputs = verdict.target_argmax[: self.w + 1]  # o_j: the target's token for window position j
        for j in range(self.w - self.n + 2):  # (w_j .. w_(j+N-2), o_(j+N-1))
            gram = (*window[j:j + self.n - 1], outputs[j + self.n - 1])
            if len(gram) == self.n:
                entries = self.pool.setdefault(gram[0], OrderedDict())
                entries.pop(gram[1:], None)
                entries[gram[1:]] = None
                self._added.append((gram[0], gram[1:]))
                while len(entries) > POOL_PER_HEAD:
                    entries.popitem(last=False)
        shift = verdict.accepted_count + 1  # positions now committed
        self.window = outputs[shift:]  # the Jacobi update, moved past the committed tokens

    def drain_events(self, round_index: int, piece: Callable[[int], str]) -> list[Event]:
        added, self._added = self._added, []
        if not added:
            return []
        return [PoolUpdate(round=round_index, source="lookahead", heads=[h for h, _ in added],
                           head_texts=[piece(h) for h, _ in added], continuations=[list(c) for _, c in added],
                           continuation_texts=[[piece(t) for t in c] for _, c in added], pool_size=self.pool_size)]


@register("lookahead", LookaheadConfig, "lookahead decoding: Jacobi window + n-gram pool, verified in one pass",
          family="speed-up: model-free",
          paper="Fu et al. 2024, lookahead decoding, arXiv:2402.02057")
def run(model: Any, prompt_ids: Sequence[int], config: LookaheadConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, LookaheadDrafter(config), config, rng)
