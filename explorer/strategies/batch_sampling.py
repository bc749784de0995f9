"""Several sequences sampled side by side from one prompt (one batch on a shared prompt cache), for the
strategies that pick among whole samples (MBR, first-finish search). Strategies import this module; it imports
no strategy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.sampling import StepStats, step_stats
from explorer.strategies.base import RECORD_TOP_K


@dataclass
class Samples:
    """Each row's tokens, their recorded statistics and log-probability sum; `finished_at`: the batch step at
    which a row produced an end token (None: it did not); the rows' finishing order."""

    tokens: list[list[int]]
    stats: list[list[StepStats]]
    logprobs: list[float]
    finished_at: list[int | None]
    order: list[int] = field(default_factory=list)


def sample_rows(model: Any, prompt_ids: Sequence[int], rows: int, temperature: float, rng: torch.Generator,
                max_new_tokens: int, *, greedy_row: bool = False, stop_at_first: bool = False) -> Samples:
    """`rows` sequences by ancestral sampling at `temperature` (row 0 greedy instead, with `greedy_row`), one
    batched forward pass per step; with `stop_at_first`, the batch stops as soon as one sampled row ends."""
    eos = model.eos_token_ids
    session = model.session()
    logits = session.forward(list(prompt_ids), all_logits=False).logits[-1:].expand(rows, -1)  # (rows, vocab)
    session.repeat(rows)
    out = Samples([[] for _ in range(rows)], [[] for _ in range(rows)], [0.0] * rows, [None] * rows)
    first = 1 if greedy_row else 0
    for step in range(max_new_tokens):
        probs = torch.softmax(logits[first:].float() / temperature, dim=-1)
        drawn = torch.multinomial(probs, 1, generator=rng)[:, 0].tolist()
        chosen = ([int(torch.argmax(logits[0]))] if greedy_row else []) + drawn
        feed = []
        for row, token in enumerate(chosen):
            if out.finished_at[row] is not None:  # ended: its row keeps being fed, its tokens are not kept
                feed.append(out.tokens[row][-1])
                continue
            stats = step_stats(logits[row], None, token, RECORD_TOP_K)
            out.tokens[row].append(token)
            out.stats[row].append(stats)
            out.logprobs[row] += stats.logprob
            if token in eos:
                out.finished_at[row] = step
                out.order.append(row)
            feed.append(token)
        sampled_done = [out.finished_at[r] is not None for r in range(first, rows)]
        if all(f is not None for f in out.finished_at) or (stop_at_first and any(sampled_done)):
            break
        if step + 1 < max_new_tokens:
            logits = session.forward_rows(feed).logits
    return out
