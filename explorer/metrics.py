"""Metrics across runs, computed once per table: the Spec-Bench-style speed table (speedup and mean accepted
tokens per method and prompt category), SPEED-Bench's per-category acceptance matrix and the sampling-quality
table. Plain list code, no torch: the LaTeX and Markdown writers (explorer.export) and the report figures
(viz.report) take these tables, not traces.

Metric names follow the field: mean accepted tokens per verification step (1.0 for plain decoding), speedup =
baseline wall time / method wall time on the same prompt, seed and model, in the same sweep.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from explorer.engines import SpecSteps, spec_steps, vllm_metrics
from explorer.trace import Trace

# (categories, {method: {category: (speedup, mean accepted tokens)}})
SpeedTable = tuple[list[str], dict[str, dict[str, tuple[float, float]]]]
# {method: {"runs", "entropy", "perplexity", "repetition", "distinct_2"}}
SamplingTable = dict[str, dict[str, float]]
OVERALL = "overall"  # the acceptance matrix's last column: every category of the method pooled


@dataclass(frozen=True)
class AcceptanceCell:
    """The verification steps of one method's runs in one category, pooled (summed before dividing): `runs`,
    `drafts` (steps that proposed a draft: vLLM's num_drafts), `draft_tokens` and `accepted_tokens` (the bonus
    token excluded; draft_tokens None where a run's engine did not report it)."""

    runs: int
    drafts: int
    draft_tokens: int | None
    accepted_tokens: int

    def _vllm(self) -> dict[str, Any]:
        return vllm_metrics(SpecSteps(steps=None, draft_steps=self.drafts, drafted_tokens=self.draft_tokens,
                                      accepted_tokens=self.accepted_tokens, output_tokens=None, per_step=False))

    @property
    def mean_acceptance_length(self) -> float | None:
        """vLLM's: 1 + accepted / drafts (the bonus token as the 1); None without drafts."""
        return self._vllm()["mean_acceptance_length"]

    @property
    def draft_acceptance_rate(self) -> float | None:
        """vLLM's: accepted / draft tokens, a fraction."""
        return self._vllm()["draft_acceptance_rate"]


# (categories with OVERALL last, {method: {category: AcceptanceCell}})
AcceptanceMatrix = tuple[list[str], dict[str, dict[str, AcceptanceCell]]]


def finite_mean(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def geometric_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return statistics.geometric_mean(finite) if finite else float("nan")


def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """The same dict with NaN and infinities as None (strict JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def method_label(trace: Trace) -> str:
    return trace.started.tags.get("method") or trace.started.strategy


def distinct_n(trace: Trace, n: int) -> float:
    """explorer.quality's distinct-n of the run's tokens (NaN where it has fewer than n)."""
    from explorer.quality import distinct_n as distinct

    value = distinct(trace.token_ids, n)
    return float("nan") if value is None else value


def specbench_table(traces: Sequence[Trace], baseline: str = "greedy") -> SpeedTable:
    """Method x prompt category: speedup (baseline wall time / method wall time on the same prompt, seed and
    model, geometric mean) and mean accepted tokens."""
    ok = [t for t in traces if t.status == "ok" and t.finished is not None and t.finished.wall_time_s > 0]
    base = {(t.started.prompt, t.started.seed, t.started.model_id): t.finished.wall_time_s
            for t in ok if method_label(t) == baseline}
    cells: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for trace in ok:
        category = trace.started.tags.get("category", "all")
        key = (trace.started.prompt, trace.started.seed, trace.started.model_id)
        speedup = base[key] / trace.finished.wall_time_s if key in base else float("nan")
        cells[method_label(trace)][category].append((speedup, trace.mean_accepted_tokens))
    categories = sorted({c for per in cells.values() for c in per})
    table = {
        method: {c: (geometric_mean([s for s, _ in v]), finite_mean([m for _, m in v])) for c, v in per.items()}
        for method, per in sorted(cells.items())
    }
    return categories, table


def _pool(steps: Sequence[SpecSteps]) -> AcceptanceCell:
    drafted = [s.drafted_tokens for s in steps]
    return AcceptanceCell(runs=len(steps), drafts=sum(s.draft_steps or 0 for s in steps),
                          draft_tokens=None if None in drafted else sum(d or 0 for d in drafted),
                          accepted_tokens=sum(s.accepted_tokens or 0 for s in steps))


def acceptance_matrix(traces: Sequence[Trace]) -> AcceptanceMatrix:
    """Method x prompt category (SPEED-Bench's per-category acceptance matrix, with an OVERALL column): each
    cell pools the verification steps (explorer.engines.spec_steps: our draft rounds or an imported engine's
    record) of the method's finished runs in that category and takes vLLM's definitions of the pooled counts:
    mean acceptance length = 1 + accepted / drafts, the bonus token included as the 1 and steps that drafted
    nothing left out; draft acceptance rate = accepted / draft tokens.

    Pooled, i.e. step-weighted, not a mean of per-run ratios: that is how vLLM's counters aggregate over
    requests and how AIPerf's speed-bench-report builds SPEED-Bench's matrix from them, so a short run does
    not weigh as much as a long one (specdec_bench's Category_AL averages per-request lengths instead). Runs
    without drafts (plain decoding) have no steps, and a method none of whose runs drafted is left out; so is
    an imported run that reports neither drafts nor accepted tokens."""
    cells: dict[str, dict[str, list[SpecSteps]]] = defaultdict(lambda: defaultdict(list))
    for trace in traces:
        if trace.status != "ok":
            continue
        steps = spec_steps(trace)
        if steps is None or steps.draft_steps is None or steps.accepted_tokens is None:
            continue
        cells[method_label(trace)][trace.started.tags.get("category", "all")].append(steps)
    matrix = {}
    for method, per in sorted(cells.items()):
        pooled = {category: _pool(runs) for category, runs in per.items()}
        overall = _pool([s for runs in per.values() for s in runs])
        if overall.drafts:
            matrix[method] = pooled | {OVERALL: overall}
    categories = sorted({c for per in matrix.values() for c in per} - {OVERALL})
    return categories + [OVERALL] if matrix else [], matrix


def sampling_table(traces: Sequence[Trace]) -> SamplingTable:
    """Method x (mean entropy, perplexity, repetition rate of 4-grams, distinct-2), averaged over runs."""
    grouped: dict[str, list[Trace]] = defaultdict(list)
    for trace in traces:
        if trace.status == "ok" and trace.token_steps:
            grouped[method_label(trace)].append(trace)
    return {
        method: {
            "runs": len(runs),
            "entropy": finite_mean([t.mean_entropy for t in runs]),
            "perplexity": finite_mean([t.perplexity for t in runs]),
            "repetition": finite_mean([t.repetition_rate(4) for t in runs]),
            "distinct_2": finite_mean([distinct_n(t, 2) for t in runs]),
        }
        for method, runs in sorted(grouped.items())
    }


# {method: {"runs", "strategy", "temperature", and (mean, low, high) or None per quality key and speed key}}
QualityTable = dict[str, dict[str, Any]]
QUALITY_SPEED_KEYS = ("tokens_per_s", "passes_per_token")


def quality_table(traces: Sequence[Trace], reference_texts: Sequence[str] | None = None,
                  model: Any = None) -> QualityTable:
    """Method x the per-run quality metrics (explorer.quality.run_quality) and speed, each as mean and 95 %
    Student-t interval over the method's finished runs (its seeds and prompts), plus self-BLEU-4 among its runs
    and, given reference texts and a model, MAUVE of its outputs against them (explorer.quality.group_quality).
    A method is one configuration: a sweep's label (temperature included)."""
    from explorer.quality import group_quality, mean_interval

    grouped: dict[str, list[Trace]] = defaultdict(list)
    for trace in traces:
        if trace.status == "ok" and trace.token_steps:
            grouped[method_label(trace)].append(trace)
    table: QualityTable = {}
    for method, runs in sorted(grouped.items()):
        first = runs[0].started
        row = group_quality(runs, reference_texts, model)
        row |= {"strategy": first.strategy, "temperature": first.config.get("temperature"),
                "tokens_per_s": mean_interval([t.tokens_per_s for t in runs]),
                "passes_per_token": mean_interval([m for t in runs
                                                   if (m := t.metrics()["forward_passes_per_token"]) is not None])}
        table[method] = row
    return table


# Logit rounding of each dtype, in nats: two candidates closer than this at the argmax are a tie that the dtype
# cannot order reliably (a verification pass over k tokens and a one-token pass may round them apart).
TIE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}


@dataclass(frozen=True)
class LosslessCheck:
    """A greedy-rule run against greedy decoding: "identical", "tie" (the first difference is at a step whose
    two best tokens are within the dtype's rounding, in either run), or "differs"."""

    status: str
    step: int | None = None
    gap: float | None = None  # the smaller top-1 / top-2 log-probability gap at that step


def lossless_check(trace: Trace, baseline: Trace) -> LosslessCheck:
    tolerance = TIE_TOLERANCE.get(trace.started.dtype, TIE_TOLERANCE["float32"])
    for ours, theirs in zip(trace.token_steps, baseline.token_steps, strict=False):
        if ours.token_id != theirs.token_id:
            gaps = [s.top_logprobs[0] - s.top_logprobs[1] for s in (ours, theirs) if len(s.top_logprobs) > 1]
            gap = min(gaps) if gaps else None
            tied = gap is not None and gap <= tolerance and {ours.token_id, theirs.token_id} <= {
                *ours.top_ids[:2], *theirs.top_ids[:2]}
            return LosslessCheck("tie" if tied else "differs", ours.step, gap)
    return LosslessCheck("identical")  # every step both made agrees (a run cut shorter is a prefix)
