"""Metrics across runs, computed once per table: the Spec-Bench-style speed table (speedup and mean accepted
tokens per method and prompt category) and the sampling-quality table. Plain list code, no torch: the LaTeX and
Markdown writers (explorer.export) and the report figures (viz.report) take these tables, not traces.

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

from explorer.trace import Trace

# (categories, {method: {category: (speedup, mean accepted tokens)}})
SpeedTable = tuple[list[str], dict[str, dict[str, tuple[float, float]]]]
# {method: {"runs", "entropy", "perplexity", "repetition", "distinct_2"}}
SamplingTable = dict[str, dict[str, float]]


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
    ids = trace.token_ids
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


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
