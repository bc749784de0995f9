"""Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; the copy drafter of CopySpec, Dumitru et al.
2025, arXiv:2502.08923): draft by copying what followed the latest earlier occurrence of the last n tokens.

Each round: for n = max_ngram down to min_ngram, find the latest earlier match of the context's last n tokens
in prompt + output and propose the (up to gamma) tokens that followed it; no match, no draft (a plain step, so
text with nothing to copy pays almost nothing). After a draft that is rejected outright, lookups pause for
1, 2, 4, ... (up to `backoff`) steps, so chance matches in free text cost little. The draft is deterministic
(q = a point mass), verified by the greedy rule or exactly by the sampling rule. gamma starts at 2 and adapts
to recent acceptance (see DraftLength).

Authors' code: apoorvumang/prompt-lookup-decoding find_candidate_pred_tokens (README, demo-pld.ipynb): n from 3
down to 1, the first (earliest) match whose 10 following tokens all exist, a fixed 10-token draft, greedy
decoding. CopySpec (RazvanDu/CopySpec speculative_copying.py) also copies from the first occurrence. Departures:
the latest match, n down to min_ngram 2, shorter continuations accepted, the adaptive length, the back-off and the
sampling rule are ours.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_verify import Drafter, DraftLength, DraftTree, SpeculativeConfig, Verdict, draft_verify


@dataclass(frozen=True)
class PromptLookupConfig(SpeculativeConfig):
    max_ngram: int = param(3, "longest n-gram to match", minimum=1, maximum=8, step=1)
    min_ngram: int = param(2, "shortest n-gram to match", minimum=1, maximum=8, step=1)
    draft_length: int = param(10, "maximum number of tokens copied per round", minimum=1, maximum=32, step=1)
    adaptive: bool = param(True, "adapt the draft length to recent acceptance")
    backoff: int = param(8, "after a fully rejected draft, skip drafting for 1, 2, 4 ... up to this many steps "
                            "(0 = off)", minimum=0, maximum=64, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_ngram > self.max_ngram:
            raise ValueError("need min_ngram <= max_ngram")


def find_continuation(context: Sequence[int], max_ngram: int, min_ngram: int, length: int
                      ) -> tuple[list[int], int, int]:
    """(continuation, n, match start) of the latest earlier match of the last n tokens, longest n first."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(context) <= n:
            continue
        pattern = list(context[-n:])
        last = pattern[-1]
        for start in range(len(context) - n - 1, -1, -1):  # latest first; the suffix itself is excluded
            if context[start + n - 1] == last and list(context[start:start + n]) == pattern:
                continuation = list(context[start + n:start + n + length])
                if continuation:
                    return continuation, n, start
    return [], 0, -1


class PromptLookupDrafter(Drafter):
    name = "prompt lookup"

    def __init__(self, config: PromptLookupConfig):
        self.config = config
        self.length = DraftLength(config.draft_length, config.adaptive, start=2)  # copies earn longer drafts
        self._drafted = 0
        self.cooldown = 0  # plain steps left before the next lookup
        self.penalty = 0  # the next cooldown after a failure (doubles up to config.backoff)

    def propose(self, context: Sequence[int]) -> DraftTree:
        if self.cooldown > 0:
            self.cooldown -= 1
            self._drafted = 0
            return DraftTree()
        tokens, n, start = find_continuation(context, self.config.max_ngram, self.config.min_ngram,
                                             self.length.current)
        self._drafted = len(tokens)
        return DraftTree.chain(tokens, ngram=float(n), match_position=float(start)) if tokens else DraftTree()

    def observe(self, verdict: Verdict) -> None:
        self.length.update(verdict, self._drafted)
        if verdict.accepted_count == 0 and self.config.backoff:
            self.penalty = min(max(1, 2 * self.penalty), self.config.backoff)
            self.cooldown = self.penalty
        else:
            self.penalty = 0


@register("prompt_lookup", PromptLookupConfig, "prompt lookup: copy the continuation of the latest n-gram match",
          family="speed-up: model-free",
          paper="Saxena 2023, prompt lookup decoding; CopySpec, Dumitru et al. 2025, arXiv:2502.08923",
          reference_code=("apoorvumang/prompt-lookup-decoding: README.md (demo-pld.ipynb): "
                          "find_candidate_pred_tokens; RazvanDu/CopySpec: speculative_copying.py: "
                          "SpeculativeDecoder.generate"),
          departures=(
              "Copies after the latest earlier match; the authors' find_candidate_pred_tokens (and CopySpec) take the "
              "first, earliest match.",
              "n runs from max_ngram 3 down to min_ngram 2; the authors go down to 1.",
              "The draft starts at 2 tokens and adapts (up to 10), and a match with fewer tokens after it still "
              "drafts; the authors copy a fixed 10 and use only a match with all 10 following it.",
              "After a fully rejected draft, lookups pause for 1, 2, 4, ... steps (back-off): ours.",
              "The sampling rule is ours; the authors' experiments are greedy (sampling untested in their README).",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: PromptLookupConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, PromptLookupDrafter(config), config, rng)
