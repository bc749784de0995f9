"""Token-level constraints for constrained decoding: a regex or a JSON schema compiled against the model's
tokenizer, asked one token at a time ("may this token come next?") or for the whole vocabulary at once (the mask).

The engine is llguidance (Microsoft; MIT; a Rust core with Python wheels, maintained and used for structured
output by vLLM, SGLang and llama.cpp). Chosen because it answers the per-token question lazily (the parser
advances over the token's bytes; no precomputed index over the vocabulary, unlike outlines-core's
state x token table) — the cost model that adaptive rejection sampling is about — and it also computes the
full-vocabulary mask for the masking baseline, from one grammar object, for regexes, JSON schemas and Lark
grammars. Built per tokenizer once (~0.3 s for SmolLM2's 49k tokens).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch

KINDS = ("regex", "json_schema")
MAX_PATTERN = 2000  # characters of a regex or schema a visitor may send


class Constraint(ABC):
    """What a sampler asks a constraint. `evaluations` counts per-token questions (the unit AWRS saves)."""

    evaluations: int = 0

    @abstractmethod
    def allows(self, token: int) -> bool:
        """Whether `token` may come next (one evaluation)."""

    @abstractmethod
    def advance(self, token: int) -> None:
        """Commit `token` (it must be allowed)."""

    def mask(self, vocab_size: int) -> torch.Tensor:
        """Every token's verdict at once, `(vocab,)` bool: the masking baseline (|V| evaluations)."""
        return torch.tensor([self.allows(t) for t in range(vocab_size)], dtype=torch.bool)

    @property
    def finished(self) -> bool:
        """No token may follow any more (the output is complete)."""
        return False


class PrefixConstraint(Constraint):
    """A constraint given by a predicate on the token sequence: `valid(prefix + [token])` (tests, toy vocabularies)."""

    def __init__(self, valid: Callable[[Sequence[int]], bool]):
        self.valid, self.prefix, self.evaluations = valid, [], 0

    def allows(self, token: int) -> bool:
        self.evaluations += 1
        return self.valid([*self.prefix, token])

    def advance(self, token: int) -> None:
        self.prefix.append(token)


class _PlainTokens:
    """A tokenizer llguidance's HF reader does not know (e.g. a character-level one with a Fuse decoder), given
    to it as the bytes of each token's own text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [tokenizer.decode([i]).encode("utf-8") for i in range(len(tokenizer))]
        self.special_token_ids = list(tokenizer.all_special_ids)

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@cache
def _ll_tokenizer(tokenizer: Any) -> Any:
    import llguidance
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer)
    except ValueError:  # a decoder it cannot read: give it the tokens' texts
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_PlainTokens(tokenizer)))


class GrammarConstraint(Constraint):
    """A regex or JSON schema over the model's tokens, through an llguidance matcher."""

    def __init__(self, tokenizer: Any, kind: str, pattern: str):
        try:
            import llguidance
        except ImportError:
            raise ValueError("constrained decoding needs llguidance: pip install llguidance") from None
        if kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}")
        if not pattern.strip():
            raise ValueError(f"give a {kind.replace('_', ' ')} to constrain the output")
        if len(pattern) > MAX_PATTERN:
            raise ValueError(f"the {kind.replace('_', ' ')} is {len(pattern)} characters: at most {MAX_PATTERN}")
        make = (llguidance.LLMatcher.grammar_from_regex if kind == "regex"
                else llguidance.LLMatcher.grammar_from_json_schema)
        try:
            grammar = make(pattern)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"cannot compile the {kind.replace('_', ' ')}: {str(error).splitlines()[0]}") from None
        try:
            self.tokenizer = _ll_tokenizer(tokenizer)
        except ValueError as error:
            raise ValueError(f"llguidance cannot read this model's tokenizer: {str(error).splitlines()[0]}") from None
        self.matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(f"cannot compile the {kind.replace('_', ' ')}: "
                             f"{self.matcher.get_error().splitlines()[0]}")
        self.evaluations = 0
        self.eos = int(self.tokenizer.eos_token)

    def allows(self, token: int) -> bool:
        self.evaluations += 1
        return token < self.tokenizer.vocab_size and self.matcher.validate_tokens([token]) == 1

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} breaks the constraint")

    def mask(self, vocab_size: int) -> torch.Tensor:
        self.evaluations += vocab_size
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        unpacked = ((bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        size = min(vocab_size, unpacked.numel())
        allowed[:size] = unpacked[:size]
        return allowed

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())
