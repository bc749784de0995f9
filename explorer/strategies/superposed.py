"""Superposed decoding: k drafts from one forward pass per step (Shen, Fang, Bhagavatula, Kusupati, Farhadi,
Reddy 2024, "Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass",
arXiv:2405.18400).

Notation: k = drafts; d_i = draft i, s_i = its score (log-probability, with the n-gram filter); gamma_i = its
superposition weight; E(x) = the embedding of token x; p = the model's next-token distribution on the
superposed input; P_n = the n-gram model (explorer.ngram); lambda = weight of the model in the interpolation.
0. Run the prompt; the top-k tokens of p start the k drafts.
1. Superpose: the next input is the single vector sum_i gamma_i E(last token of d_i), gamma_i = exp(s_i) /
   sum_j exp(s_j) (the drafts' normalised probabilities); one forward pass gives p.
2. Expand: the top-k tokens t of p extend every draft: k^2 candidates (d_i, t), scored
   s_i + log(lambda p(t) + (1 - lambda) P_n(t | d_i)): the n-gram term is what tells the drafts apart (they all
   share p) and filters the incoherent pairings.
3. Keep the k best candidates as the new drafts (their tokens are the next superposed input).
The run commits the best draft at the end (a search strategy: it needs the token budget) and records every
step's drafts, weights and k^2 candidates (SuperposedStep), and the k final drafts (SuperposedResult).
Departures: the paper's n-gram models come from a large corpus (RedPajama); ours from the Python standard
library's docstrings (explorer/ngram.py documents source and size), so its filter is weaker; the paper mixes
orders 2-6, ours 1-4 with Jelinek-Mercer weights. Committed tokens are re-scored under a plain teacher-forced
pass, so their recorded log-probabilities are the model's own, not the superposed ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, SuperposedResult, SuperposedStep
from explorer.ngram import corpus_ngrams
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register


@dataclass(frozen=True)
class SuperposedConfig(Checked):
    drafts: int = param(3, "k: drafts decoded together", minimum=2, maximum=8, step=1)
    model_weight: float = param(0.5, "lambda: weight of the model against the n-gram filter", minimum=0.0,
                                maximum=1.0, step=0.05)
    ngram_order: int = param(4, "longest n-gram of the filter", minimum=1, maximum=6, step=1)


@dataclass
class Draft:
    tokens: list[int]
    score: float


def superposition_weights(scores: Sequence[float]) -> list[float]:
    """gamma_i = exp(s_i) / sum_j exp(s_j)."""
    top = max(scores)
    raw = [math.exp(s - top) for s in scores]
    return [r / sum(raw) for r in raw]


def expand(drafts: Sequence[Draft], logp: torch.Tensor, k: int, ngram: Any, model_weight: float
           ) -> list[tuple[int, int, float, float, float]]:
    """Step 2: every (draft i, top-k token t) candidate as (i, t, log p(t), log P_n(t | d_i), score), best first."""
    top = torch.topk(logp, k)
    candidates = []
    for i, draft in enumerate(drafts):
        for token, lm in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            filtered = ngram.probability(draft.tokens, token)
            mixed = model_weight * math.exp(lm) + (1 - model_weight) * filtered
            candidates.append((i, token, lm, math.log(filtered), draft.score + math.log(mixed)))
    return sorted(candidates, key=lambda c: (-c[4], c[0], c[1]))


@register("superposed", SuperposedConfig, "superposed decoding: k drafts from one pass per step, n-gram filtered",
          needs_budget=True, family="search",
          paper="Shen et al. 2024, Superposed Decoding, arXiv:2405.18400")
def run(model: Any, prompt_ids: Sequence[int], config: SuperposedConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    k = config.drafts
    ngram = corpus_ngrams(model.tokenizer, model.model.config.vocab_size, config.ngram_order)
    embed = model.model.get_input_embeddings()
    session = model.session()
    logp = torch.log_softmax(session.forward(list(prompt_ids), all_logits=False)[-1].float(), dim=-1)
    top = torch.topk(logp, k)  # 0. the first tokens of the k drafts
    drafts = [Draft([t], v) for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
    eos = model.eos_token_ids
    for step in range(1, max_new_tokens):
        active = [d for d in drafts if d.tokens[-1] not in eos]  # a finished draft stays as it is
        if not active:
            break
        weights = superposition_weights([d.score for d in active])  # 1.
        ids = torch.tensor([d.tokens[-1] for d in active], device=model.device)
        with torch.inference_mode():
            vector = (torch.tensor(weights, device=model.device).unsqueeze(1) * embed(ids).float()).sum(0)
        logp = torch.log_softmax(session.forward_embedding(vector), dim=-1)
        candidates = expand(active, logp, k, ngram, config.model_weight)  # 2.
        finished = [d for d in drafts if d.tokens[-1] in eos]
        pool = sorted([*((c[4], 0, c) for c in candidates), *((d.score, 1, d) for d in finished)],
                      key=lambda item: -item[0])[:k]  # 3. the k best of the candidates and the finished drafts
        kept = [candidates.index(item[2]) for item in pool if item[1] == 0]
        yield SuperposedStep(step=step, drafts=[model.decode(d.tokens) for d in active],
                             weights=[round(w, 6) for w in weights],
                             candidate_drafts=[c[0] for c in candidates], candidate_tokens=[c[1] for c in candidates],
                             candidate_texts=[model.piece(c[1]) for c in candidates],
                             model_logprobs=[round(c[2], 6) for c in candidates],
                             ngram_logprobs=[round(c[3], 6) for c in candidates],
                             scores=[round(c[4], 6) for c in candidates], kept=kept)
        drafts = [Draft([*active[item[2][0]].tokens, item[2][1]], item[2][4]) if item[1] == 0 else item[2]
                  for item in pool]
    drafts = [Draft(d.tokens[: next((j + 1 for j, t in enumerate(d.tokens) if t in eos), len(d.tokens))], d.score)
              for d in drafts]
    yield SuperposedResult(drafts=[d.tokens for d in drafts], texts=[model.decode(d.tokens) for d in drafts],
                           scores=[round(d.score, 6) for d in drafts], chosen=0)
    best = drafts[0].tokens
    logits = model.session().forward([*prompt_ids, *best], all_logits=True)[len(prompt_ids) - 1:]  # (len, vocab)
    for i, token in enumerate(best):
        yield commit_token(model, i, len(prompt_ids) + i, token, logits[i])
