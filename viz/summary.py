"""The cross-lane summary: what is on screen as one Spec-Bench-style table, drawn as HTML and copyable as
Markdown or LaTeX.

Speedup is shown only where it means something: a greedy-rule draft-verify lane (its output is greedy's, so the
two did the same work) against a greedy lane of the same comparison. For sampling, search or differently
filtered lanes, a time ratio says nothing about speed-ups, so the cell stays empty.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from explorer.export import latex_escape
from explorer.metrics import lossless_check
from explorer.trace import Trace
from viz.figures import first_divergence
from viz.labels import lane_name

COLUMNS = [("lane", "lane", ""), ("tokens", "tokens", "d"), ("tokens_per_s", "tok/s", ".1f"),
           ("speedup", "speedup", ".2f"), ("mean_accepted", "MAT", ".2f"),
           ("passes_per_token", "target passes / token", ".2f"), ("mean_entropy", "mean entropy", ".3f"),
           ("perplexity", "perplexity", ".3f"), ("distinct_2", "distinct-2", ".2f"),
           ("ngram_entropy", "n-gram entropy", ".2f"), ("coherence", "coherence", ".2f"),
           ("diverges_at", "first divergence from lane 1", "")]
# the columns a lane run over several seeds shows as mean ± 95 % interval (explorer.quality.mean_interval)
OVER_SEEDS = ("tokens", "tokens_per_s", "mean_accepted", "passes_per_token", "mean_entropy", "perplexity",
              "distinct_2", "ngram_entropy", "coherence")


def speedup_against(trace: Trace, baseline: Trace | None) -> float | None:
    """baseline wall time / this lane's, when this lane is a greedy-rule draft-verify method and the baseline
    is greedy (both finished); else None."""
    if (baseline is None or trace is baseline or baseline.started.strategy != "greedy"
            or trace.started.config.get("rule") != "greedy" or trace.finished is None or baseline.finished is None
            or trace.finished.wall_time_s <= 0):
        return None
    return baseline.finished.wall_time_s / trace.finished.wall_time_s


def greedy_baseline(traces: Sequence[Trace | None]) -> Trace | None:
    return next((t for t in traces if t is not None and t.started.strategy == "greedy"), None)


def summary_rows(traces: Sequence[Trace | None], groups: dict[int, list[Trace]] | None = None
                 ) -> list[dict[str, Any]]:
    """One row per lane; with `groups` ({lane index: its runs over seeds, the lane's own first}), the numbers of
    the lane's finished runs as (mean, low, high) over seeds."""
    from explorer.quality import mean_interval

    shown = [(i, t) for i, t in enumerate(traces) if t is not None]
    baseline = greedy_baseline(traces)
    reference = shown[0][1] if shown else None
    rows = []
    for index, trace in shown:
        divergence = first_divergence(reference, trace) if trace is not reference else None
        row = _numbers(trace, baseline)
        runs = [t for t in (groups or {}).get(index, []) if t.status == "ok"]
        if len(runs) > 1:
            each = [_numbers(t, baseline) for t in runs]
            row |= {key: mean_interval([r[key] for r in each if isinstance(r[key], (int, float))])
                    for key in OVER_SEEDS}
            row["seeds"] = len(runs)
        rows.append({
            "lane": lane_name(trace, index) + (f" · {len(runs)} seeds" if len(runs) > 1 else ""), **row,
            "diverges_at": "—" if trace is reference or not (trace.token_steps and reference.token_steps)
            else _divergence_label(trace, reference, divergence),  # an imported record has no tokens to compare
        })
    return rows


def _numbers(trace: Trace, baseline: Trace | None) -> dict[str, Any]:
    from explorer.quality import run_quality

    m, q = trace.metrics(), run_quality(trace)
    return {"tokens": m["new_tokens"], "tokens_per_s": m["tokens_per_s"],
            "speedup": speedup_against(trace, baseline), "mean_accepted": m["mean_accepted_tokens"],
            "passes_per_token": m["forward_passes_per_token"], "mean_entropy": m["mean_entropy"],
            "perplexity": m["perplexity"], "distinct_2": q["distinct_2"], "ngram_entropy": q["ngram_entropy"],
            "coherence": q["coherence"]}


def _divergence_label(trace: Trace, reference: Trace, divergence: Any) -> str:
    """'never', 'step k', or 'step k (tie)' where the two best tokens there are within the dtype's rounding."""
    if divergence is None:
        return "never"
    tie = lossless_check(trace, reference).status == "tie"
    return f"step {divergence.step}" + (" (tie)" if tie else "")


def _cell(value: Any, spec: str) -> str:
    if isinstance(value, tuple):  # (mean, low, high) over seeds
        mean, low, high = value
        spec = ".1f" if spec == "d" else spec
        return f"{_cell(mean, spec)} ± {_cell((high - low) / 2, spec)}"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec) if spec else str(value)


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 2) + "---|"]
    for row in rows:
        cells = [_cell(row[key], spec).replace("|", r"\|") for key, _, spec in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_latex(rows: Sequence[dict[str, Any]]) -> str:
    lines = [r"\begin{tabular}{l" + "r" * (len(COLUMNS) - 2) + "l}", r"\toprule",
             " & ".join(latex_escape(title) for _, title, _ in COLUMNS) + r" \\", r"\midrule"]
    for row in rows:
        lines.append(" & ".join(latex_escape(_cell(row[key], spec)) for key, _, spec in COLUMNS) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def summary_html(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(row[key], spec))}</td>" for key, _, spec in COLUMNS)
                   + "</tr>" for row in rows)
    return f'<table class="lane-summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
