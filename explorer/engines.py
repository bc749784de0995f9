"""Speculative-decoding acceptance as the inference engines define it, from one neutral record.

Engines count the same rounds differently: whether the bonus token is in the acceptance length, whether a
per-position rate divides by every drafting step or only by the steps that reached the position, whether a step
that drafted nothing counts, whether a tree's draft tokens are its nodes or its depth. `SpecSteps` is a request's
verification steps once; each engine's metrics are a function of it, with the engine's own names and a docstring
that cites where the engine defines them. `spec_steps(trace)` reads our recorded runs (a DraftRound is a step that
drafted, a plain TokenStep of a draft-verify run a step that drafted nothing) and an imported engine's record
alike, so the same views and tables draw both.

Sources (the engines' code and pull requests, read for this module):
- vLLM, server-wide: vllm/v1/spec_decode/metrics.py (SpecDecodingStats.observe_draft, SpecDecodingLogging.log):
  num_drafts, num_draft_tokens, num_accepted_tokens, num_accepted_tokens_per_pos; mean acceptance length =
  1 + accepted / drafts ("conventionally ... includes the bonus token"); per-position rate = accepted at i / drafts
  (marginal). Per request (PR #48915, `--per-request-spec-decode-metrics summary|detailed`): the response's
  `metrics.speculative_decoding` with the same definitions, a dense `acceptance_histogram` of length k + 1, and
  `per_step_accepted` / `per_step_drafted` at the detailed level.
- SGLang: the response's meta_info (TokenizerManager._calculate_spec_decoding_metrics, later
  fill_spec_decoding_meta; names unified in PR #23530): `spec_verify_ct`; `spec_accept_length` = completion tokens /
  verify passes; `spec_accept_rate` = correct drafts / (verify passes x (num_draft_tokens - 1)), i.e. against the
  nominal budget, not what was proposed; `spec_correct_drafts_histogram` (alias `spec_accept_histogram`, PR #18332),
  dense, grown on demand. Conditional per-position acceptance: PR #31750 (SpecAcceptMetrics).
- NVIDIA AIPerf: profile_export.jsonl records (`spec_decode_acceptance`, src/aiperf/common/models/
  spec_decode_models.py): a sparse histogram {j: steps}, bonus excluded; checked by
  `_check_aggregate_invariants` (sum h = steps, sum j h = accepted, accepted <= drafted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from explorer.events import DraftRound, EngineRecord, TokenStep
from explorer.trace import Trace
from explorer.trees import tree_depths


@dataclass(frozen=True)
class SpecSteps:
    """One request's verification steps, as every engine's metrics need them.

    Per step s (when known: `per_step` is False for an engine that reports totals only): `drafted[s]` draft tokens
    proposed (a tree: every node; 0: a step that verified no draft, e.g. n-gram lookup found no match),
    `depth[s]` draft positions proposed (a chain: its length; a tree: its longest path), `accepted[s]` draft tokens
    accepted (the bonus / correction token excluded). Totals always: `steps` verification passes, `draft_steps`
    steps with a draft, `drafted_tokens`, `accepted_tokens`, `output_tokens`; `accepted_per_position[i]` steps
    that accepted position i, `drafted_per_position[i]` steps that proposed it (None: not reported)."""

    steps: int | None
    draft_steps: int | None
    drafted_tokens: int | None
    accepted_tokens: int | None
    output_tokens: int | None
    drafted: tuple[int, ...] = ()
    depth: tuple[int, ...] = ()
    accepted: tuple[int, ...] = ()
    accepted_per_position: tuple[int, ...] = ()
    drafted_per_position: tuple[int, ...] | None = None
    per_step: bool = True
    budget: int | None = None  # the draft budget k where a record states it (else the longest draft seen)

    @classmethod
    def of_steps(cls, drafted: Sequence[int], depth: Sequence[int], accepted: Sequence[int],
                 output_tokens: int | None = None) -> SpecSteps:
        """Every total and per-position count from per-step lists (`output_tokens` defaults to one token per
        step plus the accepted ones: what a verification step commits)."""
        if not len(drafted) == len(depth) == len(accepted):
            raise ValueError("per-step drafted, depth and accepted must have one entry per step")
        if any(a < 0 or a > d or d > n for n, d, a in zip(drafted, depth, accepted, strict=True)):
            raise ValueError("a step accepted more draft positions than it proposed, or proposed a negative number")
        width = max(depth, default=0)
        return cls(steps=len(drafted), draft_steps=sum(1 for n in drafted if n > 0), drafted_tokens=sum(drafted),
                   accepted_tokens=sum(accepted),
                   output_tokens=output_tokens if output_tokens is not None else len(drafted) + sum(accepted),
                   drafted=tuple(drafted), depth=tuple(depth), accepted=tuple(accepted),
                   accepted_per_position=tuple(sum(a > i for a in accepted) for i in range(width)),
                   drafted_per_position=tuple(sum(d > i for d in depth) for i in range(width)))

    @property
    def max_depth(self) -> int:
        if self.budget is not None:
            return self.budget
        return max(self.depth, default=0) if self.per_step else len(self.accepted_per_position)


def spec_steps(trace: Trace) -> SpecSteps | None:
    """A run's verification steps: an imported engine's record, or our own draft rounds (None: a run that
    never drafted, i.e. not speculative decoding)."""
    record = next((e for e in trace.events if isinstance(e, EngineRecord)), None)
    if record is not None:
        return from_record(record)
    if not any(isinstance(e, DraftRound) for e in trace.events):
        return None
    drafted, depth, accepted = [], [], []
    for event in trace.events:
        if isinstance(event, DraftRound):
            drafted.append(len(event.draft_tokens))
            depth.append(max(tree_depths(event.parents), default=-1) + 1)
            accepted.append(event.accepted_count)
        elif isinstance(event, TokenStep) and event.origin == "plain":
            drafted.append(0)
            depth.append(0)
            accepted.append(0)
    return SpecSteps.of_steps(drafted, depth, accepted, output_tokens=len(trace.decoded_steps))


def from_record(record: EngineRecord) -> SpecSteps:
    """The neutral steps of an engine's record: per step where it gave per-step counts, else its totals."""
    if record.per_step_accepted:
        drafted = record.per_step_drafted or record.per_step_depth
        depth = record.per_step_depth or drafted
        if drafted:
            return SpecSteps.of_steps(drafted, depth, record.per_step_accepted, record.output_tokens)
    return SpecSteps(steps=record.steps, draft_steps=record.draft_steps, drafted_tokens=record.drafted_tokens,
                     accepted_tokens=record.accepted_tokens, output_tokens=record.output_tokens,
                     accepted_per_position=tuple(record.accepted_per_position),
                     drafted_per_position=tuple(record.drafted_per_position) or None, per_step=False,
                     budget=_budget(record))


def _budget(record: EngineRecord) -> int | None:
    """The draft budget k a record states: vLLM's num_spec_tokens, or SGLang's proposed drafts per verify pass
    (nominal: verify passes x k)."""
    stated = record.reported.get("num_spec_tokens")
    if isinstance(stated, int) and not isinstance(stated, bool) and stated >= 0:
        return stated
    if record.engine == "sglang" and record.steps and record.drafted_tokens is not None:
        return record.drafted_tokens // record.steps
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


# ------------------------------------------------------------------------------------------ definitions
def vllm_metrics(s: SpecSteps) -> dict[str, Any]:
    """vLLM's `metrics.speculative_decoding` (PR #48915; SpecDecodingStats): a *spec step* is a step that proposed
    tokens (a step that proposed nothing writes no row); `mean_acceptance_length` = 1 + accepted / spec steps (the
    bonus as the +1); `draft_acceptance_rate` = accepted / draft tokens (a fraction); `acceptance_histogram[j]` =
    spec steps that accepted exactly j draft tokens (dense, length k + 1, `num_spec_tokens` = k, the longest draft
    here); `per_step_accepted` / `per_step_drafted` (the detailed level). `per_position_acceptance_rate` (the
    server's log line, SpecDecodingLogging.log) = accepted at i / spec steps: marginal, every step in the
    denominator whether or not it proposed position i."""
    drafts = s.draft_steps
    out: dict[str, Any] = {
        "mean_acceptance_length": None if not drafts or s.accepted_tokens is None else 1 + s.accepted_tokens / drafts,
        "draft_acceptance_rate": _ratio(s.accepted_tokens, s.drafted_tokens),
        "num_spec_steps": drafts, "num_accepted_draft_tokens": s.accepted_tokens,
        "num_draft_tokens": s.drafted_tokens, "num_spec_tokens": s.max_depth,
    }
    if s.per_step:
        steps = [(n, a) for n, a in zip(s.drafted, s.accepted, strict=True) if n > 0]
        out["acceptance_histogram"] = dense_histogram([a for _, a in steps], s.max_depth)
        out["per_step_accepted"] = [a for _, a in steps]
        out["per_step_drafted"] = [n for n, _ in steps]
    out["per_position_acceptance_rate"] = [a / drafts for a in s.accepted_per_position] if drafts else []
    return out


def sglang_metrics(s: SpecSteps) -> dict[str, Any]:
    """SGLang's meta_info: `spec_verify_ct` = verification passes (every decode step of a speculative run, one
    that found no draft included); `spec_accept_length` = completion tokens / verify passes (bonus included; on
    SGLang the prefill's first token too, which this tool's engine does not have: its first token comes from the
    first verification pass); `spec_num_proposed_drafts` = verify passes x the draft budget k (nominal: SGLang
    charges every pass the full budget, whatever an adaptive drafter proposed); `spec_accept_rate` = correct
    drafts / proposed drafts; `spec_correct_drafts_histogram[j]` = passes that accepted exactly j draft tokens
    (dense, as long as the largest j seen), also under its older name `spec_accept_histogram`. SGLang writes
    none of these for a request with no verify pass."""
    proposed = None if s.steps is None else s.steps * s.max_depth
    out: dict[str, Any] = {
        "spec_verify_ct": s.steps,
        "spec_accept_length": _ratio(s.output_tokens, s.steps),
        "spec_accept_rate": _ratio(s.accepted_tokens, proposed),
        "spec_num_correct_drafts": s.accepted_tokens, "spec_num_proposed_drafts": proposed,
    }
    if s.per_step:
        out["spec_correct_drafts_histogram"] = dense_histogram(list(s.accepted), 0)
        out["spec_accept_histogram"] = out["spec_correct_drafts_histogram"]
    return out


def aiperf_histogram(s: SpecSteps) -> dict[str, int]:
    """AIPerf's acceptance histogram: sparse, {accepted draft tokens (bonus excluded): steps}, only the counts
    that occur, over the steps that drafted; JSON keys are strings."""
    if not s.per_step:
        return {}
    counts: dict[int, int] = {}
    for n, a in zip(s.drafted, s.accepted, strict=True):
        if n > 0:
            counts[a] = counts.get(a, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def conditional_acceptance(s: SpecSteps) -> list[float | None]:
    """Conditional per-position acceptance (SGLang PR #31750, SpecAcceptMetrics: alpha[j] = P(position j accepted
    | positions 0..j-1 accepted)): a step that accepted c of a draft of depth B observes positions < min(c + 1, B)
    and accepts positions < c; a position beyond an adaptive draft's depth is censored, not rejected. None where
    no step observed the position."""
    if not s.per_step:
        return []
    rates: list[float | None] = []
    for i in range(s.max_depth):
        observed = [a for d, a in zip(s.depth, s.accepted, strict=True) if d > i and a >= i]
        rates.append(sum(a > i for a in observed) / len(observed) if observed else None)
    return rates


def mean_rate_by_position(s: SpecSteps) -> list[float | None]:
    """Per-position acceptance over the steps that proposed the position (this tool's `acceptance_by_position`):
    between vLLM's (every draft in the denominator) and the conditional rate (only steps that reached i)."""
    if s.drafted_per_position is None:
        return []
    return [a / d if d else None for a, d in zip(s.accepted_per_position, s.drafted_per_position, strict=True)]


def dense_histogram(values: Sequence[int], width: int) -> list[int]:
    counts = [0] * (max([width, *values], default=0) + 1)
    for v in values:
        counts[v] += 1
    return counts


def engine_metrics(trace: Trace) -> dict[str, Any] | None:
    """Every engine's metrics of a run, by engine, plus the conditional and the mean per-position rates (None:
    the run did not decode speculatively)."""
    s = spec_steps(trace)
    if s is None:
        return None
    return {"vllm": vllm_metrics(s), "sglang": sglang_metrics(s), "aiperf": {"acceptance_histogram":
            aiperf_histogram(s)}, "conditional_acceptance": conditional_acceptance(s),
            "acceptance_by_position": mean_rate_by_position(s)}


def acceptance_histogram(trace: Trace) -> list[int] | None:
    """[j] = drafting steps that accepted exactly j draft tokens (vLLM's dense histogram): from the steps where
    known, else as an engine reported it (None: neither)."""
    s = spec_steps(trace)
    if s is not None and s.per_step:
        return vllm_metrics(s)["acceptance_histogram"]
    record = trace.engine_record
    if record is not None and record.acceptance_histogram:
        return list(record.acceptance_histogram)
    if record is not None and record.per_step_accepted:  # e.g. Spec-Bench: every step, drafted or not
        return dense_histogram(record.per_step_accepted, 0)
    return None


def marginal_rate_by_position(trace: Trace) -> list[float]:
    """vLLM's per-position rate (accepted at i / drafting steps), from whatever the run holds."""
    s = spec_steps(trace)
    if s is None or not s.draft_steps and not s.steps:
        return []
    steps = s.draft_steps or s.steps
    return [a / steps for a in s.accepted_per_position]
