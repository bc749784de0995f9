"""A token n-gram model built on this machine, for the strategies that filter with one (superposed decoding).

Corpus: the docstrings of the Python standard library's top-level modules (module, class and function
docstrings read with `ast` from the `.py` files of the running interpreter's stdlib, nothing imported): English
technical prose present wherever Python is, about 0.9 M characters / 0.24 M SmolLM2 tokens on Python 3.11
(`corpus_stats()` reports the exact size). It is tokenised with the model's tokenizer, so the n-grams are over
that model's token ids; built once per tokenizer per process (~2 s).

Probabilities: Jelinek-Mercer interpolation of the maximum-likelihood estimates of orders 1..n,
P(w | h) = sum_k lambda_k P_ML(w | last k-1 tokens of h), lambda = normalised `weights` (higher orders weigh
more), with an add-one unigram so that no token has probability 0.
"""

from __future__ import annotations

import ast
import sysconfig
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

MAX_CHARACTERS = 2_000_000


@cache
def stdlib_docstrings() -> tuple[str, ...]:
    """Every module, class and function docstring of the stdlib's top-level modules, in file order."""
    texts: list[str] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if text and total < MAX_CHARACTERS:
                    texts.append(text)
                    total += len(text)
    return tuple(texts)


def corpus_stats() -> dict[str, int]:
    texts = stdlib_docstrings()
    return {"docstrings": len(texts), "characters": sum(len(t) for t in texts)}


@dataclass
class NgramModel:
    """Counts of every n-gram of orders 1..n over token sequences."""

    order: int = 4
    vocab_size: int = 1
    weights: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    counts: list[Counter] = field(default_factory=list)  # counts[k - 1][(h..., w)] for order k
    contexts: list[Counter] = field(default_factory=list)  # contexts[k - 1][(h...)] for order k
    tokens: int = 0

    def __post_init__(self) -> None:
        if len(self.weights) != self.order:
            raise ValueError("give one interpolation weight per order")
        self.counts = [Counter() for _ in range(self.order)]
        self.contexts = [Counter() for _ in range(self.order)]

    def add(self, ids: Sequence[int]) -> None:
        ids = list(ids)
        self.tokens += len(ids)
        for k in range(1, self.order + 1):
            grams, heads = self.counts[k - 1], self.contexts[k - 1]
            for i in range(len(ids) - k + 1):
                gram = tuple(ids[i:i + k])
                grams[gram] += 1
                heads[gram[:-1]] += 1

    def probability(self, history: Sequence[int], token: int) -> float:
        """P(token | history), interpolated over the orders."""
        total_weight = sum(self.weights)
        unigram = (self.counts[0][(token,)] + 1) / (self.tokens + self.vocab_size)
        value = self.weights[0] * unigram
        for k in range(2, self.order + 1):
            head = tuple(history[-(k - 1):]) if len(history) >= k - 1 else None
            seen = self.contexts[k - 1][head] if head is not None else 0
            if seen:
                value += self.weights[k - 1] * self.counts[k - 1][(*head, token)] / seen
            else:  # an unseen history: its weight falls back to the unigram
                value += self.weights[k - 1] * unigram
        return value / total_weight


_MODELS: dict[str, NgramModel] = {}


def corpus_ngrams(tokenizer: object, vocab_size: int, order: int = 4) -> NgramModel:
    """The stdlib-docstring n-gram model over `tokenizer`'s ids (built once per tokenizer and order)."""
    key = f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}:{vocab_size}:{order}"
    if key not in _MODELS:
        model = NgramModel(order=order, vocab_size=vocab_size,
                           weights=tuple(float(k) for k in range(1, order + 1)))
        for ids in tokenizer(list(stdlib_docstrings()), add_special_tokens=False)["input_ids"]:
            model.add(ids)
        _MODELS[key] = model
    return _MODELS[key]
