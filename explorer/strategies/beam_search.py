"""The beam search loop shared by `beam` and `diverse_beam` (the algorithm and its notation are in beam.py):
one group's running beams and finished hypotheses (`BeamGroup`), and the batched loop over groups that records
every candidate. Strategies import this module; it imports no strategy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.events import BeamResult, BeamStep, Event
from explorer.sampling import StepStats, step_stats
from explorer.strategies.base import RECORD_TOP_K, commit_token

EARLY_STOPPING = ("false", "true", "never")
MAX_BEAM_TOKENS = 16 * 1024  # beams x new tokens: the KV cache holds every beam's whole sequence


def check_beam_cost(num_beams: int, max_new_tokens: int) -> None:
    if num_beams * max_new_tokens > MAX_BEAM_TOKENS:
        raise ValueError(f"{num_beams} beams x {max_new_tokens} new tokens = {num_beams * max_new_tokens}; the limit "
                         f"is {MAX_BEAM_TOKENS}: use fewer beams or fewer new tokens")
NEG = -1.0e9


@dataclass
class Hypothesis:
    tokens: list[int]
    stats: list[StepStats]
    score: float
    end_step: int
    end_candidate: int


@dataclass
class BeamGroup:
    """One group's beams: running sequences and scores, finished hypotheses, and the stop heuristic."""

    width: int
    eos: frozenset[int]
    prompt_length: int
    max_length: int
    length_penalty: float
    early_stopping: str
    group: int = 0
    running: list[list[int]] = field(default_factory=list)
    running_stats: list[list[StepStats]] = field(default_factory=list)
    running_scores: torch.Tensor | None = None
    finished: list[Hypothesis | None] = field(default_factory=list)
    finished_scores: torch.Tensor | None = None
    improvable: bool = True
    done: bool = False

    def __post_init__(self) -> None:
        self.running = [[] for _ in range(self.width)]
        self.running_stats = [[] for _ in range(self.width)]
        self.running_scores = torch.full((self.width,), NEG)
        self.running_scores[0] = 0.0  # all beams start as copies of the prompt: only one may expand at first
        self.finished = [None] * self.width
        self.finished_scores = torch.full((self.width,), NEG)
        self.keep = max(2, 1 + len(self.eos)) * self.width

    def expand(self, log_probs: torch.Tensor, logits: torch.Tensor, step: int, texts: Any
               ) -> tuple[BeamStep, list[int]]:
        """One step from log-probabilities `(width, vocab)` (already penalised, for diverse groups) and the raw
        logits of the same rows (for the recorded token statistics). Returns the event and, for every new
        running beam, the row it continues (to reorder the KV cache)."""
        vocab, device = log_probs.shape[-1], log_probs.device
        if self.running_scores.device != device:  # scores live where the model runs
            self.running_scores, self.finished_scores = self.running_scores.to(device), self.finished_scores.to(device)
        cur_len = self.prompt_length + step
        total = (log_probs + self.running_scores[:, None]).reshape(-1)  # 1. (width * vocab,)
        top_scores, top_index = torch.topk(total, self.keep)
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        at_limit = cur_len + 1 >= self.max_length
        ends = torch.tensor([at_limit or t in self.eos for t in tokens], device=device)
        # 3. the best candidates that go on
        going = top_scores + ends.float() * NEG
        next_order = torch.topk(going, self.width).indices.tolist()
        # 2. finished hypotheses: candidates that end among the top `width`
        in_top = torch.arange(self.keep, device=device) < self.width
        normalised = top_scores / ((cur_len + 1 - self.prompt_length) ** self.length_penalty)
        all_done = self.early_stopping == "true" and all(h is not None for h in self.finished)
        penalty = (NEG if all_done else 0.0) + (0.0 if self.improvable else NEG)
        new_scores = normalised + penalty + (~(ends & in_top)).float() * NEG
        merged = torch.cat([self.finished_scores, new_scores])
        best = torch.topk(merged, self.width).indices.tolist()
        stats_cache: dict[int, StepStats] = {}

        def stats_for(i: int) -> StepStats:
            if i not in stats_cache:
                stats_cache[i] = step_stats(logits[parents[i]], None, tokens[i], RECORD_TOP_K)
            return stats_cache[i]

        finished, finished_flags = [], []
        for index in best:
            if index < self.width:
                finished.append(self.finished[index])
                finished_flags.append(self.finished_scores[index])
            else:
                i = index - self.width
                real = bool(ends[i] and in_top[i]) and float(new_scores[i]) > NEG / 2
                finished.append(Hypothesis([*self.running[parents[i]], tokens[i]],
                                           [*self.running_stats[parents[i]], stats_for(i)],
                                           float(normalised[i]), step, i) if real else None)
                finished_flags.append(new_scores[i])
        added = {index - self.width for index in best if index >= self.width and finished[best.index(index)]}
        self.finished, self.finished_scores = finished, torch.stack(finished_flags)
        statuses = ["pruned"] * self.keep
        slots = [-1] * self.keep
        for slot, i in enumerate(next_order):
            statuses[i], slots[i] = "kept", slot
        for i in added:
            statuses[i] = "finished"
        self.running = [[*self.running[parents[i]], tokens[i]] for i in next_order]
        self.running_stats = [[*self.running_stats[parents[i]], stats_for(i)] for i in next_order]
        self.running_scores = going[next_order]
        rows = [parents[i] for i in next_order]
        # 4. can a running beam still beat the worst finished hypothesis?
        cur_len += 1
        if self.early_stopping == "never" and self.length_penalty > 0:
            best_length = self.max_length - self.prompt_length
        else:
            best_length = cur_len - self.prompt_length
        best_possible = float(self.running_scores[0]) / (best_length ** self.length_penalty)
        all_finished = all(h is not None for h in self.finished)
        worst_finished = float(self.finished_scores.min()) if all_finished else NEG
        self.improvable = self.improvable and best_possible > worst_finished
        open_beam = not (all_finished and self.early_stopping == "true")
        self.done = not (self.improvable and open_beam and not bool(ends.all()))
        event = BeamStep(
            step=step, group=self.group, parents=parents, tokens=tokens, texts=[texts(t) for t in tokens],
            scores=top_scores.tolist(), statuses=statuses, slots=slots,
            finished_scores=[float(normalised[i]) if i in added else None for i in range(self.keep)],
        )
        return event, rows

    def hypotheses(self) -> list[Hypothesis]:
        return [h for h in self.finished if h is not None]


def beam_loop(model: Any, prompt_ids: Sequence[int], groups: list[BeamGroup], max_new_tokens: int,
              num_return: int, diversity: float = 0.0) -> Iterator[Event]:
    """Run beam groups over one batched cache (rows = the groups' beams, in order); yield BeamSteps, then the
    n-best BeamResult and the best hypothesis as TokenSteps. With `diversity` > 0, each group's log-probs are
    lowered by diversity x (how often previous groups chose the token at this step): Hamming diversity."""
    session = model.session()
    first = session.forward(list(prompt_ids), all_logits=False).logits  # (1, vocab)
    rows = sum(g.width for g in groups)
    session.repeat(rows)
    logits = first.expand(rows, -1)
    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(logits, dim=-1)  # (rows, vocab)
        chosen_counts = torch.zeros(log_probs.shape[-1], device=log_probs.device)
        order: list[int] = []
        offset = 0
        for group in groups:
            block = slice(offset, offset + group.width)
            if group.done:  # finished groups keep their rows, untouched
                order += list(range(block.start, block.stop))
            else:
                penalised = log_probs[block] - diversity * chosen_counts
                event, parents = group.expand(penalised, logits[block], step, model.piece)
                yield event
                order += [offset + p for p in parents]
                for token in (t for t, s in zip(event.tokens, event.statuses, strict=True) if s == "kept"):
                    chosen_counts[token] += 1
            offset += group.width
        if all(g.done for g in groups):
            break
        session.reorder(order)
        tokens = [0 if group.done else group.running[slot][-1] for group in groups for slot in range(group.width)]
        logits = session.forward_rows(tokens).logits
    best = sorted(((h, g.group) for g in groups for h in g.hypotheses()), key=lambda x: -x[0].score)[:num_return]
    yield BeamResult(
        hypotheses=[h.tokens for h, _ in best], texts=[model.decode(h.tokens) for h, _ in best],
        scores=[h.score for h, _ in best], groups=[g for _, g in best], end_steps=[h.end_step for h, _ in best],
        end_candidates=[h.end_candidate for h, _ in best],
        logprobs=[sum(stat.logprob for stat in h.stats) for h, _ in best],
    )
    if best:
        winner = best[0][0]
        for i, (token, stats) in enumerate(zip(winner.tokens, winner.stats, strict=True)):
            yield commit_token(model, i, len(prompt_ids) + i, token, stats=stats)
