"""`Trace`: the one object that viz, store and export consume. It holds events and derives everything else."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from explorer.events import BRANCH_ORIGINS, DraftRound, EngineRecord, RunFinished, RunStarted, TokenStep
from explorer.trees import tree_depths


@dataclass
class Trace:
    """Events of one run in order: a RunStarted, the steps, and (once it ended) a RunFinished."""

    started: RunStarted
    events: list[Any] = field(default_factory=list)
    finished: RunFinished | None = None

    @property
    def run_id(self) -> str:
        return self.started.run_id

    @property
    def status(self) -> str:
        return self.finished.status if self.finished else "running"

    def add(self, event: Any) -> None:
        if isinstance(event, RunStarted):
            raise ValueError("a trace has exactly one RunStarted")
        if isinstance(event, RunFinished):
            if self.finished is not None:
                raise ValueError("a trace has at most one RunFinished")
            self.finished = event
        else:
            self.events.append(event)

    def all_events(self) -> list[Any]:
        return [self.started, *self.events, *([self.finished] if self.finished else [])]

    # --------------------------------------------------------------------------------------- derived
    @property
    def token_steps(self) -> list[TokenStep]:
        return [e for e in self.events if isinstance(e, TokenStep)]

    @property
    def token_ids(self) -> list[int]:
        record = self.engine_record
        if record is not None:
            return list(record.token_ids)
        return [s.token_id for s in self.token_steps]

    @property
    def engine_record(self) -> EngineRecord | None:
        """What an inference engine reported, for a run imported from its records (None for our own runs)."""
        return next((e for e in self.events if isinstance(e, EngineRecord)), None)

    @property
    def new_tokens(self) -> int:
        """Tokens the run produced (an imported run: as its engine counted them)."""
        record = self.engine_record
        if record is not None:
            return record.output_tokens or (self.finished.new_tokens if self.finished else 0)
        return len(self.token_steps)

    @property
    def text(self) -> str:
        """The decoded output (exact once finished; the concatenated pieces while running)."""
        if self.finished is not None:
            return self.finished.text
        return "".join(s.token_text for s in self.token_steps)

    def token_text(self, token_id: int) -> str:
        """Text of a token id seen anywhere in this trace (chosen or among the top-k)."""
        for step in self.token_steps:
            if step.token_id == token_id:
                return step.token_text
            if token_id in step.top_ids:
                return step.top_texts[step.top_ids.index(token_id)]
        return f"#{token_id}"

    @property
    def rounds(self) -> list[DraftRound]:
        return [e for e in self.events if isinstance(e, DraftRound)]

    def has_round_detail(self, key: str) -> bool:
        """Whether a draft round recorded `key` in its details (an empty string records nothing): how a view knows
        that a run holds what it draws, whatever the strategy is called."""
        return any(r.details.get(key) not in (None, "") for r in self.rounds)

    def has_step_detail(self, key: str) -> bool:
        """Whether a committed token recorded `key` in its details."""
        return any(key in s.details for s in self.token_steps)

    @property
    def decoded_steps(self) -> list[TokenStep]:
        """The tokens the run's strategy chose: all of them, less a branch's copied prefix and forced token."""
        return [s for s in self.token_steps if s.origin not in BRANCH_ORIGINS]

    @property
    def verification_rounds(self) -> int:
        """Target verification passes that committed tokens: draft rounds plus plain one-token steps (an imported
        run: its engine's count, 0 where it gave none)."""
        record = self.engine_record
        if record is not None:
            return record.steps or 0
        return len(self.rounds) + sum(1 for s in self.token_steps if s.origin == "plain")

    @property
    def mean_accepted_tokens(self) -> float:
        """Committed tokens per verification round, bonus included (1.0 for plain decoding; a branch's prefix and
        forced token are not the strategy's and do not count). SGLang's `spec_accept_length` is the same ratio."""
        rounds = self.verification_rounds
        decoded = self.new_tokens if self.engine_record is not None else len(self.decoded_steps)
        return decoded / rounds if rounds else float("nan")

    def acceptance_by_depth(self) -> list[float]:
        """Per-position acceptance rate: accepted draft tokens at depth d / rounds that drafted depth d."""
        record = self.engine_record
        if record is not None:  # as reported: only where the engine says which positions each step drafted
            return [a / d if d else math.nan
                    for a, d in zip(record.accepted_per_position, record.drafted_per_position, strict=False)]
        drafted: list[int] = []
        accepted: list[int] = []
        for round_ in self.rounds:
            seen: set[int] = set()
            for depth, verdict in zip(tree_depths(round_.parents), round_.verdicts, strict=True):
                while len(drafted) <= depth:
                    drafted.append(0)
                    accepted.append(0)
                if depth not in seen:
                    drafted[depth] += 1
                    seen.add(depth)
                accepted[depth] += verdict == "accepted"
        return [a / d for a, d in zip(accepted, drafted, strict=True)]

    def repetition_rate(self, n: int) -> float:
        """Share of the output's n-grams that repeat an earlier n-gram of the output (0 = none repeat):
        explorer.quality's rep-n, 0 for an output shorter than n."""
        from explorer.quality import rep_n

        value = rep_n(self.token_ids, n)
        return 0.0 if value is None else value

    def table(self) -> list[dict[str, Any]]:
        """One row per committed token: the per-step table."""
        return [
            {
                "step": s.step,
                "position": s.position,
                "token_id": s.token_id,
                "token": s.token_text,
                "logprob": s.logprob,
                "prob": math.exp(s.logprob),
                "rank": s.rank,
                "entropy": s.entropy,
                "kept_count": s.kept_count,
                "origin": s.origin,
                **s.details,
            }
            for s in self.token_steps
        ]

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood of the chosen tokens under the raw model."""
        steps = self.token_steps
        if not steps:
            return float("nan")
        return math.exp(-sum(s.logprob for s in steps) / len(steps))

    @property
    def mean_entropy(self) -> float:
        steps = self.token_steps
        return sum(s.entropy for s in steps) / len(steps) if steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Tokens the strategy decoded per second of the run (a branch's prefix and forced token are given)."""
        if self.finished is None or self.finished.wall_time_s <= 0:
            return float("nan")
        given = len(self.token_steps) - len(self.decoded_steps)
        return max(0, self.finished.new_tokens - given) / self.finished.wall_time_s

    def metrics(self) -> dict[str, Any]:
        finished = self.finished
        new_tokens = self.new_tokens
        passes = finished.target_forward_passes if finished else 0
        return {
            "status": self.status,
            "new_tokens": new_tokens,
            "wall_time_s": finished.wall_time_s if finished else None,
            "tokens_per_s": self.tokens_per_s,
            "target_forward_passes": passes,
            "forward_passes_per_token": passes / decoded if (decoded := len(self.decoded_steps)) else None,
            "mean_entropy": self.mean_entropy,
            "perplexity": self.perplexity,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "verification_rounds": self.verification_rounds,
            "draft_rounds": len(self.rounds) if self.engine_record is None else self.engine_record.draft_steps,
            "acceptance_by_position": self.acceptance_by_depth(),
            "repetition_2": self.repetition_rate(2),
            "repetition_4": self.repetition_rate(4),
        }
