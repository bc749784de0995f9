"""Masked diffusion LM views: the unmasking order (step × position), a replay of the canvas step by step, what
each step committed (confidence at commit per position, tokens per forward pass), and how far a K/V cache moved
the decisions from a full pass (cache drift)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.trace import Trace
from viz.labels import lane_name, show_token
from viz.theme import FIRST_DIVERGENCE, SAME, SEQUENTIAL, base_layout, empty_figure, lane_color

MASK = "▒"


def unmask_records(trace: Trace | None) -> list:
    return [e for e in trace.events if e.kind == "unmask_step"] if trace is not None else []


@dataclass(frozen=True)
class Commit:
    position: int
    step: int
    token_text: str
    confidence: float
    before: str  # what the position was predicted as the step before (its proposal then), or "" at first sight


def commits(trace: Trace) -> dict[int, Commit]:
    """Every committed position: the step, its token and its score then, and its proposal a step earlier."""
    texts = {s.position - len(trace.started.prompt_ids): s.token_text for s in trace.token_steps}
    found: dict[int, Commit] = {}
    previous: dict[int, int] = {}
    for record in unmask_records(trace):
        proposals = dict(zip(record.masked, record.predicted_ids, strict=True))
        scores = dict(zip(record.masked, record.confidences, strict=True))
        for position, token in zip(record.committed, record.committed_ids, strict=True):
            before = previous.get(position)
            found[position] = Commit(position, record.step, texts.get(position, trace.token_text(token)),
                                     scores.get(position, math.nan),
                                     trace.token_text(before) if before is not None else "")
        previous = proposals
    return found


def unmasking_order_figure(trace: Trace | None, lane: int = 0, max_positions: int = 256) -> go.Figure:
    """Rows = denoising steps, columns = generated positions; a cell is coloured by the step at which its
    position was committed once it is (so each row is the canvas then), blank while it is still masked."""
    records = unmask_records(trace)
    if not records:
        return empty_figure("Run a diffusion lane (diffusion, prophet, credit_decoding) to see its unmasking order.")
    found = commits(trace)
    length = min(max_positions, max(max(r.masked) for r in records) + 1)
    steps = len(records)
    z: list[list[float | None]] = []
    hover: list[list[str]] = []
    for record in records:
        masked = dict(zip(record.masked, zip(record.predicted_ids, record.confidences, strict=True), strict=True))
        recomputed = set(record.recomputed)
        row, text = [], []
        for position in range(length):
            commit = found.get(position)
            if commit is not None and commit.step <= record.step:
                row.append(commit.step)
                text.append(f"position {position}: {html.escape(commit.token_text)!s} committed at step "
                            f"{commit.step} (score {commit.confidence:.3f}; the step before: "
                            f"{html.escape(commit.before) or '—'})")
            else:
                row.append(None)
                guess = masked.get(position)
                reused = " (K/V reused or pruned this step)" if record.recomputed and position not in recomputed else ""
                text.append(f"position {position}: masked{reused}" + (
                    f"; would be {html.escape(trace.token_text(guess[0]))!s} (score {guess[1]:.3f})" if guess else ""))
        z.append(row)
        hover.append(text)
    figure = go.Figure(go.Heatmap(z=z, x=list(range(length)), y=list(range(steps)), colorscale=SEQUENTIAL,
                                  zmin=0, zmax=max(1, steps - 1), hovertext=hover, hoverinfo="text",
                                  colorbar=dict(title="committed<br>at step")))
    all_in = [r.step for r in records if r.all_in]
    if all_in:
        figure.add_trace(go.Scatter(x=[length - 0.5] * len(all_in), y=all_in, mode="markers", name="all-in",
                                    marker=dict(symbol="triangle-left", size=12, color=FIRST_DIVERGENCE)))
    blocks = sorted({r.block_end for r in records if r.block_end < length})
    for edge in blocks:
        figure.add_vline(x=edge - 0.5, line=dict(color="#666666", dash="dot", width=1))
    figure.update_yaxes(autorange="reversed")
    return base_layout(figure, f"Unmasking order — {lane_name(trace, lane)} ({steps} steps, {length} positions)",
                       "generated position", "denoising step", height=min(900, 240 + 12 * steps))


def unmasking_replay_figure(trace: Trace | None, lane: int = 0, columns: int = 16, max_positions: int = 256
                            ) -> go.Figure:
    """The canvas as it stood after each step (masked positions as ▒), with a slider over the steps, as the
    LLaDA demo shows it; the tokens committed at the step shown are highlighted."""
    records = unmask_records(trace)
    if not records:
        return empty_figure("Run a diffusion lane to replay its canvas step by step.")
    found = commits(trace)
    length = min(max_positions, max(max(r.masked) for r in records) + 1)
    xs = [p % columns for p in range(length)]
    ys = [p // columns for p in range(length)]

    def state(step: int) -> tuple[list[str], list[str], list[str]]:
        texts, colors, hovers = [], [], []
        for position in range(length):
            commit = found.get(position)
            if commit is not None and commit.step <= step:
                texts.append(html.escape(show_token(commit.token_text, 6)))  # model output: escaped
                colors.append(FIRST_DIVERGENCE if commit.step == step else "#0072B2")
                hovers.append(f"position {position}: {html.escape(commit.token_text)} (step {commit.step})")
            else:
                texts.append(MASK)
                colors.append("#BBBBBB")
                hovers.append(f"position {position}: masked")
        return texts, colors, hovers

    def trace_at(step: int) -> go.Scatter:
        texts, colors, hovers = state(step)
        return go.Scatter(x=xs, y=ys, mode="markers+text", text=texts, textfont=dict(size=10, color="white"),
                          marker=dict(symbol="square", size=30, color=colors), hovertext=hovers, hoverinfo="text",
                          showlegend=False)

    last = records[-1].step
    figure = go.Figure(trace_at(last), frames=[go.Frame(data=[trace_at(r.step)], name=str(r.step)) for r in records])
    figure.update_layout(sliders=[dict(active=len(records) - 1, currentvalue=dict(prefix="after step "), pad=dict(t=40),
                                       steps=[dict(label=str(r.step), method="animate",
                                                   args=[[str(r.step)], dict(mode="immediate",
                                                                             frame=dict(duration=0, redraw=True))])
                                              for r in records])])
    figure.update_yaxes(autorange="reversed", showticklabels=False)
    figure.update_xaxes(showticklabels=False)
    rows = (length + columns - 1) // columns
    return base_layout(figure, f"Canvas replay — {lane_name(trace, lane)} (orange: committed at this step)",
                       "", "", height=min(900, 220 + 38 * rows))


def unmasking_commits_figure(traces: list[Trace]) -> go.Figure:
    """Per diffusion lane: tokens committed per denoising step (= per forward pass of the model), and the
    score each position had when it was committed."""
    lanes = [(i, t) for i, t in enumerate(traces) if unmask_records(t)]
    if not lanes:
        return empty_figure("Run diffusion lanes to compare tokens per step and confidence at commit.")
    figure = make_subplots(rows=2, cols=1, vertical_spacing=0.16,
                           subplot_titles=("tokens committed per step", "score at commit per position"))
    for index, trace in lanes:
        records = unmask_records(trace)
        name = lane_name(trace, index)
        figure.add_trace(go.Scatter(x=[r.step for r in records], y=[len(r.committed) for r in records],
                                    mode="lines+markers", name=name, line=dict(color=lane_color(index)),
                                    hovertext=[html.escape(r.rule) for r in records], hoverinfo="text+y"),
                         row=1, col=1)
        found = sorted(commits(trace).values(), key=lambda c: c.position)
        figure.add_trace(go.Scatter(x=[c.position for c in found], y=[c.confidence for c in found], mode="markers",
                                    name=name, showlegend=False, marker=dict(color=lane_color(index), size=6),
                                    hovertext=[f"{html.escape(c.token_text)} at step {c.step}" for c in found],
                                    hoverinfo="text+y"), row=2, col=1)
    base_layout(figure, "Diffusion lanes: tokens per forward pass and confidence at commit", "", "", height=620)
    figure.update_xaxes(title_text="denoising step", row=1, col=1)
    figure.update_xaxes(title_text="generated position", row=2, col=1)
    figure.update_yaxes(title_text="tokens", row=1, col=1)
    figure.update_yaxes(title_text="score", row=2, col=1)
    return figure


def drift_records(trace: Trace | None) -> list:
    return [e for e in trace.events if e.kind == "cache_drift"] if trace is not None else []


@dataclass(frozen=True)
class Drift:
    step: int
    changed: list[int]  # open-block positions whose top-1 differs between the cached and the full pass
    positions: int  # open-block masked positions compared
    mean_confidence_difference: float
    full_pass: bool

    @property
    def changed_fraction(self) -> float:
        return len(self.changed) / self.positions if self.positions else 0.0


def drift(record) -> Drift:
    """One CacheDrift record summed up: which top-1s the cache changed, mean |confidence difference|."""
    pairs = list(zip(record.positions, record.cached_ids, record.full_ids, record.cached_confidences,
                     record.full_confidences, strict=True))
    changed = [position for position, cached, full, _, _ in pairs if cached != full]
    gaps = [abs(cached - full) for *_, cached, full in pairs]
    return Drift(record.step, changed, len(pairs), sum(gaps) / len(gaps) if gaps else 0.0, record.full_pass)


def cache_drift_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """Per recorded step (the sampler's drift_every): the fraction of the open block's masked positions whose top-1
    under the cached (approximate) pass differs from a full pass over the same canvas, and the mean |difference| of
    their top-1 probabilities; steps that were full passes themselves (a cache refresh) are marked."""
    records = drift_records(trace)
    if not records:
        return empty_figure("Run a diffusion lane with cache prefix, dual or dkv and drift_every > 0 to see how far "
                            "the cache moves its decisions from a full pass.")
    summaries = [drift(r) for r in records]
    hover = []
    for record, summary in zip(records, summaries, strict=True):
        flips = {p: (c, f) for p, c, f in zip(record.positions, record.cached_ids, record.full_ids, strict=True)
                 if c != f}
        listed = ", ".join(f"{p}: {html.escape(trace.token_text(c))!s} (cached) vs "
                           f"{html.escape(trace.token_text(f))!s} (full)" for p, (c, f) in list(flips.items())[:6])
        hover.append(f"step {record.step}, block [{record.block_start}, {record.block_end})"
                     f"{' — a full pass (refresh)' if record.full_pass else ''}<br>"
                     f"top-1 differs at {len(flips)} of {summary.positions} positions"
                     f"{': ' + listed if listed else ''}{' …' if len(flips) > 6 else ''}<br>"
                     f"mean |Δ confidence| {summary.mean_confidence_difference:.4f}, "
                     f"max |Δ logit| {record.max_logit_difference:.4f}")
    steps = [s.step for s in summaries]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                           subplot_titles=("top-1 changed by the cache", "confidence changed by the cache"))
    color = lane_color(lane)
    for row, values in ((1, [s.changed_fraction for s in summaries]),
                        (2, [s.mean_confidence_difference for s in summaries])):
        figure.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name="cached step", showlegend=row == 1,
                                    line=dict(color=color), marker=dict(color=color, size=7),
                                    hovertext=hover, hoverinfo="text"), row=row, col=1)
        refreshed = [(s.step, v, h) for s, v, h in zip(summaries, values, hover, strict=True) if s.full_pass]
        if refreshed:
            figure.add_trace(go.Scatter(x=[r[0] for r in refreshed], y=[r[1] for r in refreshed], mode="markers",
                                        name="full pass (refresh)", showlegend=row == 1,
                                        marker=dict(symbol="square-open", size=11, color=SAME, line=dict(width=2)),
                                        hovertext=[r[2] for r in refreshed], hoverinfo="text"), row=row, col=1)
    base_layout(figure, f"Cache drift — {lane_name(trace, lane)} (cached pass vs a full pass, open block)", "", "",
                height=560)
    figure.update_xaxes(title_text="denoising step", row=2, col=1)
    figure.update_yaxes(title_text="fraction of positions", range=[-0.03, 1.03], row=1, col=1)
    figure.update_yaxes(title_text="mean |Δ confidence|", rangemode="tozero", row=2, col=1)
    return figure
