"""Momentum decoding (Lan, Su, Liu, Huang, Mao 2022, "Momentum Decoding: Open-ended Text Generation As Graph
Exploration", arXiv:2212.02175).

Generation explores a directed graph whose nodes are tokens and whose edges are the transitions made so far
(prompt included); degeneration is a walk around a loop. Among the top-k candidates, a token that is new to
the graph is taken greedily; returning to an existing node is allowed, with its momentum lowered by a
resistance that grows with the length L of the loop it would repeat, L = the longest n <= max_ngram such that
(last n - 1 tokens, v) already occurred.
  x_t = argmax over v in V(k) of  p(v | x_<t) - alpha * R(L(v))
Resistance R (`resistance`):
- "table" (default): the authors' released lookup table, R(0..5) = 0, 1, 3, 4, 5, 6 (infinite beyond 5), with
  their alpha = 0.2 and loops looked for up to 5 tokens (MomentumDecoding, `ngram_lookup_table`).
- "linear" (a named variant): R(L) = max(0, L - free_length), so loops up to free_length tokens repeat freely.
With alpha = 0 it is greedy decoding.
Departure: "table" is the authors' first released table (MomentumDecoding commit 2b58b6f, 4 Dec 2022); their
models/utlis_ngram.py changed it within a day (R(5) = 5), and its current default is 0, 0, 0, 0, 5 (a comment
gives 0, 1, 2, 3, 4, 5 "for GPT2-XL"). Which table the paper's runs used is not recorded in the code.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import CandidateStep, Event
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register

RESISTANCES = ("table", "linear")
AUTHORS_TABLE = (0.0, 1.0, 3.0, 4.0, 5.0, 6.0)  # R(L) for L = 0..5; infinite beyond (authors' first release)


@dataclass(frozen=True)
class MomentumConfig(Checked):
    top_k: int = param(5, "candidates k", minimum=1, maximum=50, step=1)
    alpha: float = param(0.2, "resistance scale alpha (>= 0)", minimum=0.0, maximum=5.0, step=0.05)
    resistance: str = param("table", "table: the authors' R = 0, 1, 3, 4, 5, 6; linear: max(0, L - free_length)",
                            choices=RESISTANCES)
    free_length: int = param(2, "linear: loops up to this n-gram length repeat freely", minimum=0, maximum=8, step=1)
    max_ngram: int = param(5, "longest loop length looked for", minimum=1, maximum=16, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resistance == "table" and self.max_ngram >= len(AUTHORS_TABLE):
            raise ValueError(f"the authors' table covers loops of up to {len(AUTHORS_TABLE) - 1} tokens: use "
                             f"max_ngram <= {len(AUTHORS_TABLE) - 1}, or resistance=linear")


class NgramGraph:
    """The n-grams (n <= max_n) seen so far, to measure the loop a candidate would close."""

    def __init__(self, tokens: Sequence[int], max_n: int):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.seen: list[set[tuple[int, ...]]] = [set() for _ in range(max_n + 1)]
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        for n in range(1, min(self.max_n, len(self.tokens)) + 1):
            self.seen[n].add(tuple(self.tokens[-n:]))

    def loop_length(self, token: int) -> int:
        """0 for a new node, else the longest n such that (last n - 1 tokens, token) was seen."""
        if (token,) not in self.seen[1]:
            return 0
        for n in range(min(self.max_n, len(self.tokens) + 1), 1, -1):
            if (*self.tokens[len(self.tokens) - n + 1:], token) in self.seen[n]:
                return n
        return 1


def resistance(length: int, config: MomentumConfig) -> float:
    """R(L) for a candidate that would close a loop of L tokens."""
    if config.resistance == "table":
        return AUTHORS_TABLE[length] if length < len(AUTHORS_TABLE) else float("inf")
    return float(max(0, length - config.free_length))


@register("momentum", MomentumConfig, "momentum decoding: greedy exploration with a resistance on loops",
          family="search",
          paper="Lan et al. 2022, momentum decoding, arXiv:2212.02175",
          reference_code=("gmftbyGMFTBY/MomentumDecoding: models/utlis_ngram.py: ResistanceDecodingNGram, "
                          "find_max_repetition_length, ngram_lookup_table_ours"),
          departures=(
              "resistance='table' is the authors' first released table (commit 2b58b6f, R = 0, 1, 3, 4, 5, 6); "
              "their current ngram_lookup_table_ours defaults to 0, 0, 0, 0, 5 (a comment gives 0, 1, 2, 3, 4, 5 "
              "'for GPT2-XL'), and the code does not record which table the paper's runs used",
              "resistance='linear' (max(0, L - free_length)) is our own variant, not the authors'",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: MomentumConfig, rng: torch.Generator) -> Iterator[Event]:
    session = model.session()
    graph = NgramGraph(prompt_ids, config.max_ngram)
    logits = session.forward(list(prompt_ids), all_logits=False).logits[-1]
    position = len(prompt_ids)
    for step in itertools.count():
        probs = torch.softmax(logits, dim=-1)
        top_p, top_ids = torch.topk(probs, min(config.top_k, probs.shape[-1]))
        lengths = [graph.loop_length(int(t)) for t in top_ids]
        penalties = [config.alpha * resistance(n, config) if config.alpha else 0.0 for n in lengths]
        scores = [float(p) - r for p, r in zip(top_p, penalties, strict=True)]
        chosen = max(range(len(scores)), key=scores.__getitem__)
        token = int(top_ids[chosen])
        yield CandidateStep(
            step=step, position=position, tokens=top_ids.tolist(), texts=[model.piece(int(t)) for t in top_ids],
            probs=top_p.tolist(), penalties=penalties, scores=scores, chosen=chosen, feature_name="loop length",
            features=[float(n) for n in lengths],
        )
        details = {"loop_length": float(lengths[chosen]), "resistance": penalties[chosen]}
        yield commit_token(model, step, position, token, logits, details=details)
        graph.add(token)
        logits = session.forward([token]).logits[-1]
        position += 1
