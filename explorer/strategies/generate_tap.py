"""transformers' own `generate`, observed from outside: what it computed, turned into our events.

Two seams, both public in transformers 5.x (generation/utils.py):
- the output of `generate(..., return_dict_in_generate=True, output_scores=True, output_logits=True)`: per new
  token the raw logits (`logits`) and the processed scores the token was chosen from (`scores`), and for beam
  search the beam row each token of a returned hypothesis came from (`beam_indices`);
- the candidate generator that assisted decoding builds (`GenerationMixin._get_candidate_generator`: a draft model,
  prompt lookup, early exit, ...). Each round `_assisted_decoding` calls its `get_candidates(input_ids)` (the
  draft) and then `update_candidate_strategy(input_ids, scores, num_matches)` with the committed tokens appended,
  the target's processed scores over the candidates and how many it accepted. `GenerateTap` wraps both methods on
  the instance transformers built, so a round is recorded from the numbers transformers itself acted on.

`generate_events` turns one output row (and the rounds) into TokenSteps (through `commit_token`, so top-k, entropy
and the kept set are computed as in our own lanes) and DraftRounds. A run around them (RunStarted, the store) is
explorer/record.py's; the `custom_generate` lane uses this module directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.events import DraftRound, Event
from explorer.strategies.base import commit_token

# What `generate` must return for a recording to hold per-step scores (a custom_generate function may ignore them).
FORCED_OUTPUTS = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True}


@dataclass
class Round:
    """One round of assisted decoding as transformers ran it: the candidate tokens, their draft probabilities q
    (1.0 for a drafter without logits, e.g. prompt lookup), the target's probabilities p of the reached ones (from
    its processed scores), `num_matches` as transformers passed it to `update_candidate_strategy`, and the tokens it
    committed (the accepted candidates and one more)."""

    drafter: str
    rule: str
    candidates: list[int]
    q: list[float]
    started: int  # the sequence length before the round
    draft_time_s: float
    verify_from: float  # perf_counter when the draft was handed over
    p: list[float | None] = field(default_factory=list)
    num_matches: int = 0
    committed: list[int] = field(default_factory=list)
    verify_time_s: float = 0.0


class GenerateTap:
    """For the length of a `with`: counts the forward passes of `model` (a transformers model) and the time to the
    end of the first, and records every assisted-decoding round (`rounds`). Everything is put back on exit."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.rounds: list[Round] = []
        self.forward_passes = 0
        self.first_pass_at: float | None = None
        self._hook: Any = None
        self._saved: Any = None

    def __enter__(self) -> GenerateTap:
        self._hook = self.model.register_forward_hook(self._counted)
        self._saved = self.model.__dict__.get("_get_candidate_generator")
        build = self.model._get_candidate_generator  # the bound method (or an outer tap's wrapper)

        def tapped(*args: Any, **kwargs: Any) -> Any:
            generator = build(*args, **kwargs)
            config = kwargs.get("generation_config", args[0] if args else None)
            self._wrap(generator, "sampling" if getattr(config, "do_sample", False) else "greedy")
            return generator

        self.model._get_candidate_generator = tapped
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hook.remove()
        if self._saved is None:
            del self.model._get_candidate_generator
        else:
            self.model._get_candidate_generator = self._saved

    def _counted(self, module: Any, inputs: Any, output: Any) -> None:
        self.forward_passes += 1
        if self.first_pass_at is None:
            self.first_pass_at = time.perf_counter()

    def _wrap(self, generator: Any, rule: str) -> None:
        propose, learn = generator.get_candidates, generator.update_candidate_strategy
        drafter = type(generator).__name__

        def get_candidates(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            candidate_ids, candidate_logits = propose(input_ids, *args, **kwargs)
            started = input_ids.shape[1]
            candidates = candidate_ids[0, started:].tolist()
            if candidate_logits is not None and candidates:  # (1, candidates, vocab): the draft's own scores
                probs = torch.softmax(candidate_logits[0].float(), dim=-1)
                q = probs[torch.arange(len(candidates)), torch.tensor(candidates, device=probs.device)].tolist()
            else:
                q = [1.0] * len(candidates)
            t1 = time.perf_counter()
            self.rounds.append(Round(drafter, rule, candidates, q, started, t1 - t0, t1))
            return candidate_ids, candidate_logits

        def update_candidate_strategy(input_ids: torch.Tensor, scores: torch.Tensor, num_matches: int) -> Any:
            done = self.rounds[-1]
            done.verify_time_s = time.perf_counter() - done.verify_from
            done.num_matches = int(num_matches)
            done.committed = input_ids[0, done.started:].tolist()
            reached = done.candidates[:done.num_matches + 1]  # the nodes the target judged
            if reached:
                probs = torch.softmax(scores[0, :len(reached)].float(), dim=-1)  # (reached, vocab)
                p = probs[torch.arange(len(reached)), torch.tensor(reached, device=probs.device)].tolist()
            else:
                p = []
            done.p = p + [None] * (len(done.candidates) - len(p))
            return learn(input_ids, scores, num_matches)

        generator.get_candidates = get_candidates
        generator.update_candidate_strategy = update_candidate_strategy


def prompt_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """The `(batch, length)` prompt ids a `generate(...)` call was given (`inputs` or `input_ids`)."""
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("recording needs the prompt's token ids: call generate with input_ids (batch, length)")
    return ids


def first_row_prompt(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Row 0's prompt tokens without its padding."""
    if attention_mask is None:
        return ids[0].tolist()
    return ids[0][attention_mask[0].bool()].tolist()


def generate_events(lm: Any, output: Any, input_length: int, prompt_ids: Sequence[int], rounds: Sequence[Round],
                    eos: frozenset[int]) -> tuple[list[Event], str]:
    """The events of row 0 of a `generate` output (a tensor, or a ModelOutput with `sequences`) and how its scores
    were obtained: "generate" (its own logits and scores), or "recomputed" (a tensor came back, e.g. from a
    custom_generate function: one pass of the model over prompt + output gives the raw logits of every step)."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new = sequences[0, input_length:].tolist()
    beam = getattr(output, "beam_indices", None)
    if beam is not None:
        rows = [int(r) for r in beam[0].tolist()[:len(new)] if r >= 0]
        new = new[:len(rows)]
    else:
        rows = [0] * len(new)
    if sequences.shape[0] > 1:  # other rows may run on: row 0 ends at its first end token
        new = new[:next((i + 1 for i, t in enumerate(new) if t in eos), len(new))]
    raw = getattr(output, "logits", None) if not isinstance(output, torch.Tensor) else None
    scores = getattr(output, "scores", None) if not isinstance(output, torch.Tensor) else None
    source = "generate"
    if raw is None and scores is not None:
        raw, scores = scores, None
    if raw is None or len(raw) < len(new):
        source, rows, scores = "recomputed", [0] * len(new), None
        raw = _teacher_forced(lm, prompt_ids, new) if new else []

    def step(t: int, position: int, origin: str) -> Event:
        logits = raw[t][rows[t]].float()  # (vocab,)
        kept = scores[t][rows[t]].float() if scores is not None else None
        if kept is not None and torch.equal(kept, logits):
            kept = None  # nothing processed the scores: the raw distribution, as our greedy lane records it
        details = {"beam": rows[t]} if beam is not None else {}
        return commit_token(lm, t, position, new[t], logits, kept, details=details, origin=origin)

    events: list[Event] = []
    usable = [r for r in rounds if r.committed]
    if usable and sum(len(r.committed) for r in usable) == len(new):
        t = 0
        for index, rnd in enumerate(usable):
            position = len(prompt_ids) + t
            if rnd.candidates:
                events.append(_draft_round(lm, index, position, rnd))
            for i in range(len(rnd.committed)):
                origin = "plain" if not rnd.candidates else ("draft" if i < rnd.num_matches else "bonus")
                events.append(step(t, position + i, origin))
                t += 1
    else:
        events = [step(t, len(prompt_ids) + t, "plain") for t in range(len(new))]
    return events, source


def _draft_round(lm: Any, index: int, position: int, rnd: Round) -> DraftRound:
    n = rnd.num_matches
    bonus = rnd.committed[-1]
    # A round cut short by an end token or the length limit commits a candidate the target agreed with as its last
    # token: that node was not rejected, the run just ended there.
    cut = n < len(rnd.candidates) and rnd.candidates[n] == bonus
    verdicts = ["accepted" if i < n else "rejected" if i == n and not cut else "unreached"
                for i in range(len(rnd.candidates))]
    return DraftRound(
        round=index, position=position, drafter=rnd.drafter, rule=rnd.rule, draft_tokens=list(rnd.candidates),
        draft_texts=[lm.piece(t) for t in rnd.candidates], parents=list(range(-1, len(rnd.candidates) - 1)),
        q=list(rnd.q), p=list(rnd.p), u=[None] * len(rnd.candidates), verdicts=verdicts, accepted_count=n,
        bonus_token=bonus, bonus_text=lm.piece(bonus),
        bonus_kind="bonus" if n == len(rnd.candidates) or cut else "correction",
        draft_time_s=rnd.draft_time_s, verify_time_s=rnd.verify_time_s,
        details={"cut": True} if cut else {},
    )


def _teacher_forced(lm: Any, prompt_ids: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Raw logits `(len(new), 1, vocab)` of the model at every step of `new`, from one pass over prompt + new."""
    ids = torch.tensor([[*prompt_ids, *new[:-1]]], device=lm.device)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, len(prompt_ids) - 1:].float()  # (len(new), vocab)
    return logits[:, None, :]
