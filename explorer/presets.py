"""Target + draft pairs that share a tokenizer, loaded by Hub id where the Hub is reachable (a Space, a laptop).

On a machine without the Hub they fail to load with the loader's message (give a local path, or download once
with network access). A Space author can add pairs of their own (local paths or Hub ids) with
DECODING_EXPLORER_PAIRS="name=target+draft;name2=target2+draft2"; the app offers the pairs its model policy
allows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPair:
    name: str
    target: str
    draft: str


PAIRS = (
    ModelPair("SmolLM2-360M-Instruct + 135M draft", "HuggingFaceTB/SmolLM2-360M-Instruct",
              "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ModelPair("SmolLM2-1.7B-Instruct + 135M draft", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
              "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ModelPair("Qwen2.5-1.5B-Instruct + 0.5B draft", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    ModelPair("Qwen2.5-7B-Instruct + 0.5B draft", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    ModelPair("Llama-3.1-8B-Instruct + Llama-3.2-1B draft", "meta-llama/Llama-3.1-8B-Instruct",
              "meta-llama/Llama-3.2-1B-Instruct"),
)


def parse_pairs(text: str) -> tuple[ModelPair, ...]:
    """'name=target+draft;...' -> pairs; ValueError naming the part that does not read."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, models = part.partition("=")
        target, _, draft = models.partition("+")
        if not (name.strip() and target.strip() and draft.strip()):
            raise ValueError(f"DECODING_EXPLORER_PAIRS: {part!r} is not name=target+draft")
        pairs.append(ModelPair(name.strip(), target.strip(), draft.strip()))
    return tuple(pairs)


def all_pairs(env: Mapping[str, str] = os.environ) -> tuple[ModelPair, ...]:
    return PAIRS + parse_pairs(env.get("DECODING_EXPLORER_PAIRS", ""))


def find_pair(name: str, pairs: tuple[ModelPair, ...]) -> ModelPair | None:
    return next((pair for pair in pairs if pair.name == name), None)
