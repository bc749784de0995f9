"""Superposed decoding: k drafts from one forward pass per step (Shen, Fang, Bhagavatula, Kusupati, Farhadi,
Reddy 2024, "Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass",
arXiv:2405.18400), following the authors' code (RAIVNLab/SuperposedDecoding: superposed/llama/superpose.py,
class Superpose; superposed_generation.py: SuperposedLlama.sup_generate; eval.py: evaluate_mixed_losses) with
the defaults of their params/p15_d3_mixed.json.

Notation: k = drafts; d_i = draft i (generated tokens), s_i = its score (the sum of its steps' mixed
log-probabilities); gamma_i = its superposition weight; E(x) = the embedding of token x; T = temperature (0.06);
n = tokens sampled per step (n_token_sample, 9); alpha = weight of the n-gram model (0.54);
P_ngram(t | h) = sum_{m=2..6} w_m P_m(t | last m-1 tokens of h), w = (0.01, 0.04, 0.15, 0.18, 0.12), summed over
the orders whose context h was seen (P_m = count ratio), unnormalised (Superpose.ngram_probs); the history h is
the prompt followed by d_i (their alive_seq holds the prompt).
0. Run the prompt: one empty draft with s = 0 (sup_generate's first step: every draft is the prompt).
1. Superpose: the input is sum_i gamma_i E(last token of d_i), gamma = softmax(s) (superposition_matrix,
   utils.log_prob_to_prob); one forward pass gives the logits z.
2. p_LLM = softmax(z / T) kept on its n most likely tokens and renormalised (sup_generate, get_top_k). Every
   draft i and sampled token t is a candidate scored s_i + (1 - alpha) log p_LLM(t) + alpha log P_ngram(t | h_i)
   (smoothing "geom"): a token without n-gram support scores -inf, and a draft where no sampled token has any
   scores s_i + (1 - alpha) log p_LLM(t) - 200 instead (the penalty).
3. Of the best 2k candidates, the k best not ending in EOS are the new drafts (grow_alive); those ending in EOS
   join the finished drafts, of which the k best are kept (grow_fin).
At the end the alive and finished drafts are ranked by perplexity exp(-s / length) and the k best kept
(evaluate_mixed_losses). The run records every step's drafts, weights and candidates (SuperposedStep) and the
k final drafts (SuperposedResult), and commits the first.
Departures, marked where they happen: the n-gram tables; dropping -inf drafts; committing one draft.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event, SuperposedResult, SuperposedStep
from explorer.ngram import NgramModel, corpus_ngrams
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register

NGRAM_WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)  # w_2..w_6: i_weights of params/p15_d3_mixed.json (i_length 1..5)


@dataclass(frozen=True)
class SuperposedConfig(Checked):
    drafts: int = param(3, "k: drafts decoded together", minimum=2, maximum=8, step=1)
    ngram_weight: float = param(0.54, "alpha: weight of the n-gram log-probability against the model's (0 turns "
                                "the n-gram model off)", minimum=0.0, maximum=1.0, step=0.02)
    temperature: float = param(0.06, "T: the model's logits are divided by this before the softmax", minimum=0.01,
                               maximum=2.0, step=0.01)
    sampled_tokens: int = param(9, "n: the model's most likely tokens each draft may extend with (the authors "
                                "use 3k)", minimum=1, maximum=64, step=1)
    penalty: float = param(200.0, "subtracted from a draft's candidates when no sampled token has n-gram support",
                           minimum=0.0, maximum=1000.0, step=10.0)
    ngram_order: int = param(6, "longest n-gram of the filter (orders 2..this)", minimum=2, maximum=6, step=1)


@dataclass
class Draft:
    tokens: list[int]
    score: float


@dataclass(frozen=True)
class Candidate:
    draft: int
    token: int
    model_logprob: float
    ngram_logprob: float
    score: float


def superposition_weights(scores: Sequence[float]) -> list[float]:
    """gamma_i = exp(s_i) / sum_j exp(s_j)."""
    top = max(scores)
    raw = [math.exp(s - top) for s in scores]
    return [r / sum(raw) for r in raw]


def model_distribution(logits: torch.Tensor, temperature: float, n: int) -> tuple[list[int], list[float]]:
    """p_LLM: softmax(logits / T) kept on its n most likely tokens, renormalised: (tokens, probabilities).
    In float32 as the authors' is, so a token whose tempered probability underflows gets p = 0 (log p = -inf)."""
    top = torch.topk(torch.softmax(logits.float() / temperature, dim=-1), n)
    return top.indices.tolist(), (top.values / top.values.sum()).tolist()


def ngram_probability(ngram: NgramModel, history: Sequence[int], token: int, order: int) -> float:
    """P_ngram(t | h) = sum_m w_m count(h_m, t) / count(h_m) over m = 2..order whose last-(m-1)-token context
    h_m was seen; 0 when none was (Superpose.ngram_probs with NGram.prob)."""
    value = 0.0
    for m, weight in zip(range(2, order + 1), NGRAM_WEIGHTS, strict=False):
        if len(history) < m - 1:
            continue
        head = tuple(history[len(history) - (m - 1):])
        seen = ngram.contexts[m - 1][head]
        if seen:
            value += weight * ngram.counts[m - 1][(*head, token)] / seen
    return value


def _weighted_log(weight: float, probability: float) -> float:
    """weight * log(probability), with 0 * log 0 = 0 so that alpha = 0 or 1 turns a term off."""
    if weight == 0:
        return 0.0
    return weight * math.log(probability) if probability > 0 else -math.inf


def mixed_logprobs(model_probs: Sequence[float], ngram_probs: Sequence[float], alpha: float, penalty: float
                   ) -> list[float]:
    """One draft's step scores for the sampled tokens: (1 - alpha) log p + alpha log P_ngram; where every one is
    -inf (no n-gram support), (1 - alpha) log p - penalty instead (Superpose.forward, smoothing "geom")."""
    mixed = [_weighted_log(1 - alpha, p) + _weighted_log(alpha, q) for p, q in zip(model_probs, ngram_probs,
                                                                                    strict=True)]
    if all(m == -math.inf for m in mixed):
        return [_weighted_log(1 - alpha, p) - penalty for p in model_probs]
    return mixed


def expand(drafts: Sequence[Draft], prompt_ids: Sequence[int], tokens: Sequence[int], model_probs: Sequence[float],
           ngram: NgramModel, config: SuperposedConfig) -> list[Candidate]:
    """Step 2: every (draft i, sampled token t) candidate with a finite score, best first."""
    candidates = []
    for i, draft in enumerate(drafts):
        history = [*prompt_ids, *draft.tokens]  # the n-gram history includes the prompt, as in alive_seq
        ngram_probs = [ngram_probability(ngram, history, t, config.ngram_order) for t in tokens]
        mixed = mixed_logprobs(model_probs, ngram_probs, config.ngram_weight, config.penalty)
        for token, p, q, m in zip(tokens, model_probs, ngram_probs, mixed, strict=True):
            # Departure: a -inf candidate is never kept; the authors' top-k may keep one when fewer than k are
            # finite, and it then runs on with gamma = 0. Here fewer than k drafts run on.
            if m > -math.inf:
                candidates.append(Candidate(i, token, _weighted_log(1.0, p), _weighted_log(1.0, q), draft.score + m))
    return sorted(candidates, key=lambda c: (-c.score, c.draft, c.token))


def perplexity_order(drafts: Sequence[Draft]) -> list[Draft]:
    """Best first by perplexity exp(-s / length), lowest first (evaluate_mixed_losses)."""
    return sorted(drafts, key=lambda d: -d.score / len(d.tokens))


@register("superposed", SuperposedConfig, "superposed decoding: k drafts from one pass per step, n-gram filtered",
          needs_budget=True, family="search",
          paper="Shen et al. 2024, Superposed Decoding, arXiv:2405.18400",
          reference_code="RAIVNLab/SuperposedDecoding: superposed/llama/superpose.py: Superpose.forward",
          departures=(
              "n-gram tables from the Python stdlib's docstrings (explorer/ngram.py), not the authors' RedPajama "
              "tables (ngrams/make_corpus.py): fewer contexts are seen, so the no-support penalty fires more",
              "a candidate scoring -inf is never kept, so fewer than k drafts may run on; the authors keep it "
              "with weight gamma = 0",
              "the best draft by perplexity is committed and re-scored by a plain pass; the authors return all k",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: SuperposedConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    k = config.drafts
    # Departure: the n-gram tables are built from the stdlib's docstrings, not RedPajama (explorer/ngram.py).
    ngram = corpus_ngrams(model.tokenizer, model.model.config.vocab_size, config.ngram_order)
    embed = model.model.get_input_embeddings()
    session = model.session()
    eos = model.eos_token_ids
    alive, finished = [Draft([], 0.0)], []  # 0. one empty draft: every draft starts as the prompt
    for step in range(max_new_tokens):
        if step == 0:
            weights = [1.0]
            logits = session.forward(list(prompt_ids), all_logits=False).logits[-1]  # (vocab,)
        else:
            weights = superposition_weights([d.score for d in alive])  # 1.
            ids = torch.tensor([d.tokens[-1] for d in alive], device=model.device)
            with torch.inference_mode():
                vector = (torch.tensor(weights, device=model.device).unsqueeze(1) * embed(ids).float()).sum(0)
            logits = session.forward_embedding(vector).logits  # (vocab,)
        tokens, model_probs = model_distribution(logits, config.temperature, config.sampled_tokens)  # 2.
        candidates = expand(alive, prompt_ids, tokens, model_probs, ngram, config)
        grown = [Draft([*alive[c.draft].tokens, c.token], c.score) for c in candidates[:2 * k]]  # 3.
        new_alive = [d for d in grown if d.tokens[-1] not in eos][:k]
        finished = sorted([*finished, *(d for d in grown if d.tokens[-1] in eos)], key=lambda d: -d.score)[:k]
        survivors = {id(d) for d in [*new_alive, *finished]}
        yield SuperposedStep(step=step, drafts=[model.decode(d.tokens) for d in alive],
                             weights=[round(w, 6) for w in weights],
                             candidate_drafts=[c.draft for c in candidates],
                             candidate_tokens=[c.token for c in candidates],
                             candidate_texts=[model.piece(c.token) for c in candidates],
                             model_logprobs=[round(c.model_logprob, 6) for c in candidates],
                             ngram_logprobs=[round(c.ngram_logprob, 6) for c in candidates],
                             scores=[round(c.score, 6) for c in candidates],
                             kept=[i for i, d in enumerate(grown) if id(d) in survivors])
        alive = new_alive
        if not alive:
            break
    drafts = perplexity_order([*alive, *finished])[:k]
    yield SuperposedResult(drafts=[d.tokens for d in drafts], texts=[model.decode(d.tokens) for d in drafts],
                           scores=[round(d.score, 6) for d in drafts], chosen=0)
    # Departure: the authors return all k drafts; we commit the best, re-scored by a plain teacher-forced pass
    # (its recorded log-probabilities are the model's own, not the superposed ones).
    best = drafts[0].tokens
    logits = model.session().forward([*prompt_ids, *best], all_logits=True).logits[len(prompt_ids) - 1:]  # (len, vocab)
    for i, token in enumerate(best):
        yield commit_token(model, i, len(prompt_ids) + i, token, logits[i])
