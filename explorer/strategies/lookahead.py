"""Lookahead decoding (Fu, Bailis, Stoica, Zhang 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding", arXiv:2402.02057).

Notation: W = lookahead window, N = n-gram size, G = guesses verified per step, L^(t) = the window's level t
(W tokens at the positions after the committed prefix), o^(t) = the target's argmax over level t.
The 2-D window keeps the last N - 1 levels, L^(t-N+2) .. L^(t): each Jacobi level feeds the next,
L^(t+1) = o^(t), so L^(t+1)_(j+1) is what the model predicted right after L^(t)_j. Each step is one target pass
over a tree hanging off the last committed token:
  - the lookahead branch: level L^(t) as a chain; the pass yields o^(t). Along every diagonal of the 2-D window,
    (L^(t-N+2)_j, L^(t-N+3)_(j+1), ..., L^(t)_(j+N-2), o^(t)_(j+N-1)) is an n-gram in which every token is the
    model's prediction after the one before it: it goes into the pool, keyed by its first token;
  - the verification branch: up to G n-grams from the pool whose first token follows the last committed token,
    each a chain of N - 1 tokens, merged into a prefix tree (n-grams that share a first token share its node,
    and so on down), so the longest correct candidate is always reachable.
The target verifies the tree at once (greedy rule: the longest path equal to its argmax; sampling rule: exact
recursive rejection over the deterministic candidates). Accepted tokens from the window are Jacobi hits, from
the n-grams pool hits (`hits`: the window is always the tree's first W nodes). The window and its past levels then
move past what was committed (columns stay aligned to absolute positions). The output equals greedy decoding
under the greedy rule.
Departures: the paper feeds all N - 1 levels through every pass ((N - 1) x W input tokens, for the attention
between levels); we feed only the newest level (W tokens) and keep the older ones as the window's memory, from
which the n-grams are read along the same diagonals. A trie node that the window and an n-gram share is the
window's. The window starts as the last W context tokens (the paper: random tokens); positions a level lacks
(after a shift) are filled with the level's last token.

Authors' code: hao-ai-lab/LookaheadDecoding lade/decoding.py (jacobi_greedy_search_multilevel, update_token_map).
Further departures from it: the window is itself verified as a candidate chain (Jacobi hits), while the authors'
code only verifies the pooled n-grams; our levels shift past what was committed (accepted + 1), while theirs
(ALWAYS_FWD_ONE, asserted) advance one position per step whatever was accepted; the pool keeps 16 n-grams per key
and verifies the G newest, theirs keeps GUESS_SET_SIZE per key (LRU) and verifies them all.
"""


from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, PoolUpdate
from explorer.params import param
from explorer.strategies.base import register, tree_prepare
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


def prefix_tree(sequences: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """Merge token sequences hanging off one root into a trie: (tokens, parents, each sequence's node indices).
    Sequences that share a prefix share its nodes; nodes keep insertion order (parents before children)."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    placed: list[list[int]] = []
    for sequence in sequences:
        parent, nodes = -1, []
        for token in sequence:
            node = index.get((parent, token))
            if node is None:
                node = index[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
            nodes.append(node)
            parent = node
        placed.append(nodes)
    return tokens, parents, placed


def hits(window: int, verdicts: Sequence[str]) -> tuple[int, int]:
    """A round's accepted tokens split into (Jacobi hits, pool hits): the window holds the first W nodes."""
    accepted = [i for i, verdict in enumerate(verdicts) if verdict == "accepted"]
    jacobi = sum(i < window for i in accepted)
    return jacobi, len(accepted) - jacobi


class LookaheadDrafter(Drafter):
    name = "lookahead"

    def __init__(self, config: LookaheadConfig):
        self.w, self.n, self.g = config.window, config.ngram, config.guesses
        self.levels: list[list[int]] = []  # the 2-D window: oldest level first, the newest is the one verified
        self.pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}  # head -> continuations, newest last
        self._added: list[tuple[int, tuple[int, ...]]] = []
        self._window_nodes: list[int] = []

    @property
    def window(self) -> list[int]:
        return self.levels[-1] if self.levels else []

    def propose(self, context: Sequence[int]) -> DraftTree:
        if not self.levels:
            self.levels = [list(context[-self.w:])]
        self.levels = [(level + [level[-1]] * self.w)[: self.w] for level in self.levels]
        guesses = list(reversed(self.pool.get(context[-1], {})))[: self.g]
        tokens, parents, placed = prefix_tree([self.window, *guesses])  # the lookahead branch first: nodes 0..W-1
        self._window_nodes = placed[0]
        tree = DraftTree(tokens, parents, [1.0] * len(tokens), None, mode="point")
        tree.details.update(window=float(self.w), guesses=float(len(guesses)), pool=float(self.pool_size),
                            levels=float(len(self.levels)))
        return tree

    @property
    def pool_size(self) -> int:
        return sum(len(v) for v in self.pool.values())

    def observe(self, verdict: Verdict) -> None:
        # o_j: the target's token for window position j (row 0 follows the last committed token, row node + 1
        # follows the window's node at position j - 1)
        argmax = verdict.target_argmax
        outputs = [argmax[0], *(argmax[node + 1] for node in self._window_nodes)]  # W + 1 tokens
        levels = [*self.levels, outputs[: self.w + 1]]  # the levels the diagonals run through, newest = o
        depth = min(self.n, len(levels))
        if depth == self.n:
            for j in range(self.w + 1 - (self.n - 1)):  # (L^(t-N+2)_j, ..., L^(t)_(j+N-2), o_(j+N-1))
                gram = tuple(levels[-self.n + i][j + i] for i in range(self.n))
                self._remember(gram)
        shift = verdict.accepted_count + 1  # positions now committed: every level moves past them
        self.levels = [level[shift:] or level[-1:] for level in levels[-(self.n - 1):]]

    def _remember(self, gram: tuple[int, ...]) -> None:
        entries = self.pool.setdefault(gram[0], OrderedDict())
        entries.pop(gram[1:], None)
        entries[gram[1:]] = None
        self._added.append((gram[0], gram[1:]))
        while len(entries) > POOL_PER_HEAD:
            entries.popitem(last=False)

    def drain_events(self, round_index: int, piece: Callable[[int], str]) -> list[Event]:
        added, self._added = self._added, []
        if not added:
            return []
        return [PoolUpdate(round=round_index, source="lookahead", heads=[h for h, _ in added],
                           head_texts=[piece(h) for h, _ in added], continuations=[list(c) for _, c in added],
                           continuation_texts=[[piece(t) for t in c] for _, c in added], pool_size=self.pool_size)]


@register("lookahead", LookaheadConfig, "lookahead decoding: Jacobi window + n-gram pool, verified in one pass",
          prepare=tree_prepare,
          family="speed-up: model-free",
          paper="Fu et al. 2024, lookahead decoding, arXiv:2402.02057",
          reference_code=("hao-ai-lab/LookaheadDecoding: lade/decoding.py: jacobi_greedy_search_multilevel, "
                          "update_token_map"),
          departures=(
              "Only the newest level (W tokens) goes through each pass, the older N - 2 kept as memory for the "
              "n-grams; the paper feeds all N - 1 levels ((N - 1) x W tokens) with attention between them.",
              "The window is itself verified as a candidate chain (Jacobi hits); the authors' code verifies only the "
              "pooled n-grams and never accepts window tokens.",
              "After a step the levels shift past the committed tokens (accepted + 1); the authors' code "
              "(ALWAYS_FWD_ONE, asserted) moves the window one position per step whatever was accepted.",
              "The pool keeps up to 16 n-grams per key and verifies the G newest (G = 3); the authors keep "
              "GUESS_SET_SIZE per key (LRU) and verify them all.",
              "Verified n-grams are merged into a trie, a node shared with the window being the window's; the "
              "authors verify each n-gram as its own branch (the same accepted tokens under the greedy rule).",
              "The window starts as the last W context tokens (the authors: random prompt tokens), and positions a "
              "level lacks after a shift repeat its last token.",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: LookaheadConfig, rng: torch.Generator) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, LookaheadDrafter(config), config, rng)
