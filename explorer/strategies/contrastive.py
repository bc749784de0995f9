"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation",
arXiv:2202.06417, Eq. 5).

Notation: V(k) = the k most likely next tokens, alpha = degeneration penalty weight, h_v = the last-layer
hidden state of candidate v, h_j (j < t) = those of the context so far (prompt included).
  x_t = argmax over v in V(k) of  (1 - alpha) * p(v | x_<t) - alpha * max_j cos(h_v, h_j)
The k candidates run through the model side by side in one pass (a tree of k siblings), which also yields the
next distribution of whichever is chosen; the cache is then compacted to the chosen one.
With alpha = 0 it is greedy decoding.
Departure (defaults only): k = 4 (transformers' documented example); the authors' released examples use k = 5,
alpha = 0.6.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import CandidateStep, Event
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register, tree_prepare


@dataclass(frozen=True)
class ContrastiveConfig(Checked):
    top_k: int = param(4, "candidates k", minimum=1, maximum=20, step=1)
    alpha: float = param(0.6, "degeneration penalty weight in [0, 1]", minimum=0.0, maximum=1.0, step=0.05)


def degeneration_penalty(candidates: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """max_j cos(h_v, h_j) for each candidate: candidates `(k, hidden)`, context `(t, hidden)` -> `(k,)`."""
    a = torch.nn.functional.normalize(candidates.float(), dim=-1)
    b = torch.nn.functional.normalize(context.float(), dim=-1)
    return (a @ b.T).max(dim=-1).values


@register("contrastive", ContrastiveConfig, "contrastive search: probability minus similarity to the context",
          prepare=tree_prepare,
          family="search",
          paper="Su et al. 2022, arXiv:2202.06417",
          reference_code="yxuansu/SimCTG: simctg/utlisgpt.py: ContrastiveDecodingOneStepFast, ranking_fast",
          departures=(
              "default k = 4 (transformers' documented example); the authors' released examples call "
              "fast_contrastive_search with k = 5, alpha = 0.6",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: ContrastiveConfig, rng: torch.Generator) -> Iterator[Event]:
    session = model.session()
    prompt_pass = session.forward(list(prompt_ids), hidden_states=True)
    context_hidden = prompt_pass.hidden[-1]  # (t, hidden): last layer
    logits = prompt_pass.logits[-1]
    position = len(prompt_ids)
    for step in itertools.count():
        probs = torch.softmax(logits, dim=-1)
        top_p, top_ids = torch.topk(probs, min(config.top_k, probs.shape[-1]))
        k = len(top_ids)
        # all k candidates in one pass as siblings: (k, vocab) next logits, (k, hidden) their states
        candidates = session.forward(top_ids.tolist(), parents=[-1] * k, hidden_states=True)
        similarity = degeneration_penalty(candidates.hidden[-1], context_hidden)
        scores = (1 - config.alpha) * top_p - config.alpha * similarity
        chosen = int(torch.argmax(scores))
        token = int(top_ids[chosen])
        yield CandidateStep(
            step=step, position=position, tokens=top_ids.tolist(), texts=[model.piece(int(t)) for t in top_ids],
            probs=top_p.tolist(), penalties=(config.alpha * similarity).tolist(), scores=scores.tolist(),
            chosen=chosen, feature_name="max cosine similarity", features=similarity.tolist(),
        )
        yield commit_token(model, step, position, token, logits,
                           details={"degeneration_penalty": float(similarity[chosen])})
        session.keep([*range(position), position + chosen])  # drop the other candidates' KV
        context_hidden = torch.cat([context_hidden, candidates.hidden[-1][chosen:chosen + 1]])
        logits = candidates.logits[chosen]
        position += 1
