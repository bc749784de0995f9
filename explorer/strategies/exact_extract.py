"""exact-extract (Castel et al. 2022, "How Optimal is Greedy Decoding for Extractive Question Answering?",
arXiv:2108.05857).

Extractive QA asks for a span of the passage; greedy decoding may wander off it. exact-extract returns the span
the model finds most probable, exactly: for every span s = x_i..x_j of the passage,
  log P(s) = Σ_{k=i..j} log p(x_k | prompt, x_i..x_{k-1}) + log p(EOS | prompt, x_i..x_j),
and the argmax over spans of at most `max_span` tokens is committed. All spans that start at i share their
prefixes, so one pass over x_i..x_{i+L-1} after the prompt scores every span starting at i; starts are decoded as
rows of one batch on the prompt's cache. The ExtractSpans event keeps the start × length table of log P (the
span-probability heatmap) and the free greedy continuation for comparison.

Departures: the passage is the prompt itself (its tokens between special tokens, e.g. inside a chat template),
as tokenized in context; a span may not cross a special token. The end-of-span term uses every end token the
model declares (log of their summed probability). The authors score spans with a T5 encoder-decoder (the decoder
starts at <extra_id_0>, a span ends with <extra_id_1>); here a decoder-only model continues the prompt. Their
length-normalised variant (log P / (length + 1)) is not offered.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, ExtractSpans
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register

MAX_SPAN_TOKENS = 8192  # starts x max_span token positions scored
BATCH = 16  # starts decoded together


@dataclass(frozen=True)
class ExactExtractConfig(Checked):
    max_span: int = param(16, "the longest span considered (tokens)", minimum=1, maximum=64, step=1)


def span_starts(prompt_ids: Sequence[int], special: set[int]) -> list[tuple[int, int]]:
    """(start, how many tokens a span from there may take) for every prompt position that is not special."""
    starts = []
    for index, token in enumerate(prompt_ids):
        if token in special:
            continue
        end = index
        while end < len(prompt_ids) and prompt_ids[end] not in special:
            end += 1
        starts.append((index, end - index))
    return starts


def best_span(table: list[list[float]]) -> tuple[int, int]:
    """(row, length) of the highest log P in a start × length table (-inf where no span)."""
    best = max(((r, k) for r, row in enumerate(table) for k, v in enumerate(row) if v > float("-inf")),
               key=lambda rk: table[rk[0]][rk[1]])
    return best[0], best[1] + 1


@register("exact_extract", ExactExtractConfig, "the most probable span of the prompt (extractive QA)",
          needs_budget=True, family="search",
          paper="Castel et al. 2022, exact-extract, arXiv:2108.05857",
          reference_code="ocastel/exact-extract: src/decoding/exact_extract.py: mlspan, mlspan_calc",
          departures=(
              "decoder-only: spans are scored as continuations of the prompt; the authors score them with a T5 "
              "encoder-decoder (passage and question in the encoder, decoder from <extra_id_0>, span ended by "
              "<extra_id_1>)",
              "the passage is the prompt itself (its text between special tokens), as tokenized in context; a "
              "span may not cross a special token",
              "the end-of-span term is log of the summed probability of every end token the model declares; the "
              "authors use one end token (<extra_id_1>)",
              "spans are limited to max_span tokens (default 16) and only the unnormalised log P is ranked; the "
              "authors also report a length-normalised variant",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: ExactExtractConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    prompt = list(prompt_ids)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    starts = span_starts(prompt, special)
    if not starts:
        raise ValueError("the prompt has no text to extract a span from")
    length = min(config.max_span, max_new_tokens)
    if len(starts) * length > MAX_SPAN_TOKENS:
        raise ValueError(f"{len(starts)} span starts x {length} tokens is over the limit of {MAX_SPAN_TOKENS}: "
                         "shorten the passage or max_span")
    eos = sorted(model.eos_token_ids)
    table: list[list[float]] = []
    for chunk in range(0, len(starts), BATCH):
        group = starts[chunk:chunk + BATCH]
        session = model.session()
        last = session.forward(prompt, all_logits=False).logits[-1]  # (vocab,): the first span token's distribution
        first = torch.log_softmax(last.float(), dim=-1)
        session.repeat(len(group))
        scores = torch.zeros(len(group))
        rows = [[float("-inf")] * length for _ in group]
        logp = first.unsqueeze(0).expand(len(group), -1)  # (rows, vocab): the next token's log p, per start
        for k in range(length):
            tokens = [prompt[s + k] if k < room else prompt[s] for s, room in group]  # padding: ignored
            scores += torch.tensor([float(logp[r, t]) for r, t in enumerate(tokens)])
            logits = session.forward_rows(tokens).logits  # (rows, vocab): after x_i..x_{i+k}
            logp = torch.log_softmax(logits.float(), dim=-1)
            ending = torch.logsumexp(logp[:, eos], dim=-1) if eos else torch.zeros(len(group))
            for r, (_, room) in enumerate(group):
                if k < room:
                    rows[r][k] = round(float(scores[r] + ending[r]), 6)
        table += rows
    row, size = best_span(table)
    start = starts[row][0]
    span = prompt[start:start + size]
    greedy, session = [], model.session()
    logits = session.forward(prompt, all_logits=False).logits[-1]
    for _ in range(min(max_new_tokens, 64)):  # the free greedy answer, for comparison
        token = int(torch.argmax(logits))
        greedy.append(token)
        if token in model.eos_token_ids:
            break
        logits = session.forward([token]).logits[-1]
    yield ExtractSpans(starts=[s for s, _ in starts], log_probs=table, best_start=start, best_length=size,
                       best_text=model.decode(span), greedy_ids=greedy, greedy_text=model.decode(greedy))
    # commit the span with the distributions it was scored under: one teacher-forced pass over prompt + span
    rows = model.session().forward(prompt + span).logits[len(prompt) - 1:]  # (len(span) + 1, vocab)
    for step, token in enumerate(span):
        yield commit_token(model, step, len(prompt) + step, token, rows[step])
    if eos and len(span) < max_new_tokens:
        yield commit_token(model, len(span), len(prompt) + len(span), int(eos[0]), rows[len(span)])
