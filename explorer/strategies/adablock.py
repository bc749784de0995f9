"""AdaBlock-dLLM (Lu et al. 2025, "AdaBlock-dLLM: Semantic-Aware Diffusion LLM Inference via Adaptive Block
Size", arXiv:2509.26432).

Semi-autoregressive decoding with a block size chosen at run time: when a block opens, the first step's
proposals in a window of the next ⌈w·L⌉ positions (w = 0.25 of the canvas) are searched for a delimiter token
(a newline by default: a semantic step ends there); if the most confident predicted delimiter has probability
≥ τ_d, the block ends just after it, otherwise it keeps the default length. Inside a block, tokens are committed
by Fast-dLLM's threshold rule (the authors' code requires it). The paper's "volatility band" is the region of
fluctuating confidence this aligns block boundaries with; the views show it as the confidence per step.

Authors' code: lgxi24/AdaBlock-dLLM llada/generate_adablock.py (compute_block_length, generate_adablock): the same
window, delimiter confidence and fallback. Departures: delimiters are given as texts and count only when they encode
to one token (the authors pass token ids: [198] for LLaDA, 24 ids for Dream); remasking=margin or entropy puts the
threshold on those scores (the authors' code offers low_confidence and random); on a causal LM the canvas is read
with the shift, and the caches need a causal architecture with a KV cache (see diffusion.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from explorer.params import MAX_TEXT_PARAM, param
from explorer.strategies.unmasking import CACHE_DEPARTURE, Schedule, UnmaskingConfig, register_diffusion


@dataclass(frozen=True)
class AdaBlockConfig(UnmaskingConfig):
    threshold: float = param(0.9, "commit every position of the block scoring at least this (at least one)",
                             minimum=0.01, maximum=1.0, step=0.01)
    delimiters: str = param("\\n", "delimiter texts that may end a block, separated by spaces (\\n = newline)",
                            max_length=MAX_TEXT_PARAM)
    delimiter_threshold: float = param(0.3, "τ_d: a predicted delimiter ends the block if its probability is "
                                            "at least this", minimum=0.0, maximum=1.0, step=0.05)
    window: float = param(0.25, "share of the canvas searched for a delimiter when a block opens", minimum=0.01,
                          maximum=1.0, step=0.05)


def delimiter_ids(tokenizer: Any, delimiters: str) -> set[int]:
    """The token ids of the delimiter texts that are one token each."""
    ids = set()
    for text in delimiters.split():
        encoded = tokenizer.encode(text.replace("\\n", "\n"), add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    return ids


def adaptive_block_end(first: int, default: int, length: int, window: float, rows: torch.Tensor,
                       proposals: torch.Tensor, probs: torch.Tensor, delimiters: set[int], threshold: float) -> int:
    """Just after the most confident delimiter proposed in the window after `first`, if it clears `threshold`;
    else `default`."""
    reach = first + max(1, min(int(window * length), length - first))
    best, best_p = None, -1.0
    for row, position in enumerate(rows.tolist()):
        token = int(proposals[row])
        if first <= position < reach and token in delimiters and float(probs[row, token]) > best_p:
            best, best_p = position, float(probs[row, token])
    return best + 1 if best is not None and best_p >= threshold else default


class AdaBlockSchedule(Schedule):
    def __init__(self, config: AdaBlockConfig, model: Any = None, rng: torch.Generator | None = None):
        super().__init__(config, model, rng)
        self.delimiters = delimiter_ids(model.tokenizer, config.delimiters)

    def block_end(self, first: int, default: int, length: int, rows: torch.Tensor, proposals: torch.Tensor,
                  probs: torch.Tensor) -> int:
        return adaptive_block_end(first, default, length, self.config.window, rows, proposals, probs,
                                  self.delimiters, self.config.delimiter_threshold)


register_diffusion("adablock", AdaBlockConfig, "diffusion: blocks end at confidently predicted delimiters",
                   paper="Lu et al. 2025, AdaBlock-dLLM, arXiv:2509.26432", schedule=AdaBlockSchedule,
                   reference_code=("lgxi24/AdaBlock-dLLM: llada/generate_adablock.py: compute_block_length, "
                                   "generate_adablock"),
                   departures=(
                       "Delimiters are texts that count only when they encode to one token; the authors pass token "
                       "ids ([198] for LLaDA, a list of 24 for Dream).",
                       "remasking=margin or entropy applies the commit threshold to those scores; the authors' code "
                       "offers low_confidence and random only.",
                       "On a causal LM the canvas is read causally with a one-position shift; the paper runs "
                       "bidirectional diffusion LMs (LLaDA, Dream).",
                       CACHE_DEPARTURE,
                   ))
