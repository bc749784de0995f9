"""Toy language models: fixed or scripted next-token distributions, no neural network."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from explorer.models import ModelInfo, Pass


class FakeSession:
    def __init__(self, lm: FakeLM):
        self.lm = lm
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def forward(self, token_ids: Sequence[int], *, parents=None, tree_base=None, all_logits: bool = True,
                hidden_states=False) -> Pass:
        rows = []
        if parents is None:
            for token in token_ids:
                self.tokens.append(int(token))
                rows.append(self.lm.logits_for(self.tokens))
        else:  # a tree after the prefix: each node sees the prefix and its own ancestors
            base = len(self.tokens) if tree_base is None else tree_base
            tree = self.tokens[base:] + [int(t) for t in token_ids]
            for node in range(len(tree) - len(token_ids), len(tree)):
                path, cursor = [], node
                while cursor >= 0:
                    path.append(tree[cursor])
                    cursor = parents[cursor]
                rows.append(self.lm.logits_for(self.tokens[:base] + path[::-1]))
            self.tokens.extend(int(t) for t in token_ids)
        self.lm.forward_passes += 1
        logits = torch.stack(rows)
        return Pass(logits if all_logits else logits[-1:])

    def crop(self, length: int) -> None:
        del self.tokens[length:]

    def keep(self, positions: Sequence[int]) -> None:
        self.tokens = [self.tokens[i] for i in positions]


class FakeLM:
    """`logits_for(context) -> (vocab,)` defines the model; tokens print as `<id>`."""

    def __init__(self, logits_for: Callable[[list[int]], torch.Tensor], vocab: int, eos: int | None = None):
        self.logits_for = logits_for
        self.vocab_size = vocab
        self.eos_token_ids = frozenset() if eos is None else frozenset({eos})
        self.has_chat_template = False
        self.forward_passes = 0
        self.device = torch.device("cpu")
        self.info = ModelInfo("fake", "none", "float32", "cpu")

    def for_run(self) -> FakeLM:
        return self

    def session(self) -> FakeSession:
        return FakeSession(self)

    def encode_prompt(self, prompt: str, *, chat: bool = False, system_prompt=None, history=()) -> list[int]:
        if not prompt.strip():
            raise ValueError("the prompt is empty: type some text to continue")
        return [ord(c) % self.vocab_size for c in prompt]

    def piece(self, token_id: int) -> str:
        return f"<{token_id}>"

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.piece(i) for i in ids)


def fixed(logits: torch.Tensor, eos: int | None = None) -> FakeLM:
    """The same next-token distribution at every step."""
    return FakeLM(lambda context: logits.clone(), len(logits), eos)


def zipf_logits(vocab: int = 200, exponent: float = 1.1) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    return -exponent * ranks.log()
