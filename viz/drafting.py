"""Views of the adaptive drafters: SpecTr's selection against recursive rejection sampling on the same drafts,
DEL's per-layer acceptance and chosen exit, and EAD's entropy-driven hand-overs between two models."""

from __future__ import annotations

import html
from statistics import fmean

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.trace import Trace
from viz.labels import lane_name, show_token
from viz.theme import LANE_COLORS, base_layout, empty_figure


def spectr_figure(trace: Trace | None, max_rounds: int = 300, lane: int = 0) -> go.Figure:
    """Per round, on the same k drafts: the chance that the root's draws yield an accepted token under K-SEQ and
    under recursive rejection sampling, and the tokens each accepted (RRS: a shadow verification)."""
    rounds = [r for r in (trace.rounds if trace is not None else []) if "kseq_root_accept" in r.details]
    if not rounds:
        return empty_figure("Run a spectr lane with the sampling rule to compare K-SEQ with rejection sampling.")
    rounds = rounds[:max_rounds]
    x = [r.round for r in rounds]
    kseq = [float(r.details["kseq_root_accept"]) for r in rounds]
    rrs = [float(r.details["rrs_root_accept"]) for r in rounds]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                           subplot_titles=("chance the first token is accepted", "draft tokens accepted"))
    figure.add_trace(go.Scatter(x=x, y=kseq, mode="lines+markers", name="K-SEQ (SpecTr)",
                                line=dict(color=LANE_COLORS[0]), hovertemplate="round %{x}: %{y:.3f}"), row=1, col=1)
    figure.add_trace(go.Scatter(x=x, y=rrs, mode="lines+markers", name="rejection sampling",
                                line=dict(color=LANE_COLORS[1], dash="dash"), marker_symbol="x",
                                hovertemplate="round %{x}: %{y:.3f}"), row=1, col=1)
    figure.add_trace(go.Bar(x=x, y=[r.accepted_count for r in rounds], name="accepted (K-SEQ)",
                            marker_color=LANE_COLORS[0], hovertemplate="round %{x}: %{y} accepted"), row=2, col=1)
    figure.add_trace(go.Scatter(x=x, y=[float(r.details["rrs_accepted"]) for r in rounds], mode="markers",
                                name="accepted (RRS, same drafts)", marker=dict(color=LANE_COLORS[1], symbol="x",
                                                                                 size=9),
                                hovertemplate="round %{x}: RRS would accept %{y}"), row=2, col=1)
    mean_kseq = fmean(r.accepted_count for r in rounds)
    mean_rrs = fmean(float(r.details["rrs_accepted"]) for r in rounds)
    base_layout(figure, f"SpecTr vs rejection sampling — {lane_name(trace, lane)}: {mean_kseq:.2f} vs "
                        f"{mean_rrs:.2f} accepted per round", "", "", height=480)
    figure.update_yaxes(title_text="probability", range=[0, 1.02], row=1, col=1)
    figure.update_yaxes(title_text="tokens", row=2, col=1)
    figure.update_xaxes(title_text="round", row=2, col=1)
    return figure


def exit_layer_figure(trace: Trace | None, max_rounds: int = 300, lane: int = 0) -> go.Figure:
    """DEL: the exit layer and draft length chosen each round, and the accepted tokens."""
    rounds = [r for r in (trace.rounds if trace is not None else []) if "exit_layer" in r.details]
    if not rounds:
        return empty_figure("Run a del lane to see the exit layer it chose round by round.")
    rounds = rounds[:max_rounds]
    x = [r.round for r in rounds]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                           subplot_titles=("exit layer E", "draft length and accepted tokens"))
    figure.add_trace(go.Scatter(x=x, y=[float(r.details["exit_layer"]) for r in rounds], mode="lines+markers",
                                line=dict(color=LANE_COLORS[0], shape="hv"), name="exit layer",
                                hovertemplate="round %{x}: exit after layer %{y}"), row=1, col=1)
    figure.add_trace(go.Bar(x=x, y=[len(r.draft_tokens) for r in rounds], name="drafted",
                            marker_color="#BBBBBB", hovertemplate="round %{x}: %{y} drafted"), row=2, col=1)
    figure.add_trace(go.Bar(x=x, y=[r.accepted_count for r in rounds], name="accepted",
                            marker_color=LANE_COLORS[2], hovertemplate="round %{x}: %{y} accepted"), row=2, col=1)
    figure.update_layout(barmode="overlay")
    base_layout(figure, f"Dynamic exit layer — {lane_name(trace, lane)}", "", "", height=460)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    figure.update_yaxes(title_text="tokens", row=2, col=1)
    figure.update_xaxes(title_text="round", row=2, col=1)
    return figure


def layer_acceptance_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """DEL's running estimate of how often a draft exiting after each layer matches the target (the last
    round's estimate), with the exit layers it chose."""
    rounds = [r for r in (trace.rounds if trace is not None else []) if "layer_acceptance" in r.details]
    if not rounds:
        return empty_figure("Run a del lane to see its per-layer acceptance estimates.")
    estimates = [[float(v) for v in str(r.details["layer_acceptance"]).split(",")] for r in rounds]
    layers = [int(v) for v in str(rounds[-1].details["candidate_exits"]).split(",")]
    z = [list(column) for column in zip(*estimates, strict=True)]  # (exit, round)
    figure = go.Figure(go.Heatmap(x=[r.round for r in rounds], y=layers, z=z,
                                  colorscale="Cividis", zmin=0, zmax=1, colorbar=dict(title="acceptance"),
                                  hovertemplate="round %{x}, exit after layer %{y}: %{z:.2f}"))
    figure.add_trace(go.Scatter(x=[r.round for r in rounds], y=[float(r.details["exit_layer"]) for r in rounds],
                                mode="markers", marker=dict(color="#D55E00", symbol="diamond", size=7),
                                name="chosen exit", hovertemplate="round %{x}: chose layer %{y}"))
    base_layout(figure, f"Per-layer acceptance estimate — {lane_name(trace, lane)}", "round",
                "exit after layer", height=420)
    return figure


def entropy_handover_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """EAD: the rolling entropy that decides who writes each token, the threshold, and each token's owner."""
    steps = [s for s in (trace.token_steps if trace is not None else []) if "rolling_entropy" in s.details]
    if not steps:
        return empty_figure("Run an ead lane to see which model wrote each token.")
    x = [s.step for s in steps]
    large = [s for s in steps if s.details.get("large", 0.0) >= 0.5]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=x, y=[s.details["rolling_entropy"] for s in steps], mode="lines", name="rolling "
                                "entropy", line=dict(color=LANE_COLORS[0]),
                                hovertemplate="step %{x}: rolling entropy %{y:.2f} bits"))
    for owner, chosen, color, symbol in (("small model", [s for s in steps if s not in large], LANE_COLORS[2],
                                          "circle"), ("large model", large, LANE_COLORS[3], "square")):
        figure.add_trace(go.Scatter(x=[s.step for s in chosen], y=[s.details["rolling_entropy"] for s in chosen],
                                    mode="markers", name=owner, marker=dict(color=color, symbol=symbol, size=8),
                                    text=[html.escape(show_token(s.token_text)) for s in chosen],
                                    hovertemplate="step %{x}: %{text} (" + owner + ")<extra></extra>"))
    threshold = float(steps[0].details["threshold"])
    figure.add_hline(y=threshold, line_dash="dash", line_color="#555555", annotation_text=f"threshold {threshold:g}")
    share = len(large) / len(steps)
    base_layout(figure, f"Entropy-adaptive decoding — {lane_name(trace, lane)}: {share:.0%} of tokens by the large "
                        "model", "step", "bits", height=400)
    return figure


def aded_figure(trace: Trace | None, max_rounds: int = 300, lane: int = 0) -> go.Figure:
    """ADED: accepted tokens per round split by whether they came from an exploring or an exploiting branch,
    their running mean (the acceptance trend), and the tri-gram matrix's growth."""
    rounds = [r for r in (trace.rounds if trace is not None else []) if "matrix_rows" in r.details]
    if not rounds:
        return empty_figure("Run an aded lane to see its matrix grow and its acceptance adapt.")
    rounds = rounds[:max_rounds]
    x = [r.round for r in rounds]
    explored, exploited = [], []
    for r in rounds:
        flags = [flag == "1" for flag in str(r.details.get("explore_mask", "")).split(",") if flag]
        accepted = [i for i, verdict in enumerate(r.verdicts) if verdict == "accepted"]
        explored.append(sum(1 for i in accepted if i < len(flags) and flags[i]))
        exploited.append(len(accepted) - explored[-1])
    window = 8
    trend = [fmean(r.accepted_count for r in rounds[max(0, i - window + 1): i + 1]) for i in range(len(rounds))]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.6, 0.4],
                           subplot_titles=("accepted draft tokens (running mean of 8 rounds)",
                                           "tri-gram matrix rows"))
    figure.add_trace(go.Bar(x=x, y=exploited, name="on exploiting branches", marker_color=LANE_COLORS[0],
                            hovertemplate="round %{x}: %{y} accepted (exploit)"), row=1, col=1)
    figure.add_trace(go.Bar(x=x, y=explored, name="on exploring branches", marker_color=LANE_COLORS[1],
                            hovertemplate="round %{x}: %{y} accepted (explore)"), row=1, col=1)
    figure.add_trace(go.Scatter(x=x, y=trend, mode="lines", name="running mean", line=dict(color="#000000"),
                                hovertemplate="round %{x}: mean %{y:.2f}"), row=1, col=1)
    figure.add_trace(go.Scatter(x=x, y=[float(r.details["matrix_rows"]) for r in rounds], mode="lines",
                                name="matrix rows", line=dict(color=LANE_COLORS[2], shape="hv"),
                                hovertemplate="round %{x}: %{y} rows"), row=2, col=1)
    figure.update_layout(barmode="stack")
    base_layout(figure, f"ADED: acceptance as the matrix adapts — {lane_name(trace, lane)}", "", "", height=480)
    figure.update_yaxes(title_text="tokens", row=1, col=1)
    figure.update_yaxes(title_text="rows", row=2, col=1)
    figure.update_xaxes(title_text="round", row=2, col=1)
    return figure


def draft_depth_figure(trace: Trace | None, max_rounds: int = 200, lane: int = 0) -> go.Figure:
    """D^3 as a drafter: the layers each draft token ran (round x draft index), accepted tokens outlined."""
    rounds = [r for r in (trace.rounds if trace is not None else []) if r.details.get("draft_depths")]
    if not rounds:
        return empty_figure("Run a depth_decay lane to see the layers each draft token ran.")
    rounds = rounds[:max_rounds]
    depths = [[int(v) for v in str(r.details["draft_depths"]).split(",")] for r in rounds]
    width = max(len(d) for d in depths)
    z = [[d[i] if i < len(d) else None for d in depths] for i in range(width)]
    x = [r.round for r in rounds]
    figure = go.Figure(go.Heatmap(x=x, y=list(range(1, width + 1)), z=z, colorscale="Cividis",
                                  colorbar=dict(title="layers"), xgap=1, ygap=1,
                                  hovertemplate="round %{x}, draft token %{y}: %{z} layers<extra></extra>"))
    accepted = [(r.round, i + 1) for r in rounds for i in range(r.accepted_count)]
    figure.add_trace(go.Scatter(x=[a for a, _ in accepted], y=[b for _, b in accepted], mode="markers",
                                marker=dict(symbol="square-open", size=12, color="#D55E00", line=dict(width=2)),
                                name="accepted", hovertemplate="round %{x}: draft token %{y} accepted<extra></extra>"))
    base_layout(figure, f"Draft depth per token (D^3) — {lane_name(trace, lane)}", "round", "draft token i",
                height=380)
    return figure


def draft_vocabulary_figure(trace: Trace | None, max_rounds: int = 300, lane: int = 0) -> go.Figure:
    """A reduced draft vocabulary's cost: per round, the accepted draft tokens, and whether the target's token at
    the first position the draft missed (the correction or bonus) lay outside the draft vocabulary — a miss the
    head could not have avoided."""
    rounds = [r for r in (trace.rounds if trace is not None else []) if r.details.get("target_in_vocab")]
    if not rounds:
        return empty_figure("Run an eagle lane to see how often the target's token was outside the draft vocabulary.")
    rounds = rounds[:max_rounds]
    flags = [[flag == "1" for flag in str(r.details["target_in_vocab"]).split(",")] for r in rounds]
    outside_at_miss = [not f[r.accepted_count] if r.accepted_count < len(f) else False for r, f in zip(rounds, flags,
                                                                                                       strict=True)]
    committed = [f[: r.accepted_count + 1] for r, f in zip(rounds, flags, strict=True)]
    share = sum(not x for f in committed for x in f) / max(1, sum(len(f) for f in committed))
    x = [r.round for r in rounds]
    figure = go.Figure(go.Bar(x=x, y=[r.accepted_count for r in rounds], name="accepted draft tokens",
                              marker_color=LANE_COLORS[0], hovertemplate="round %{x}: %{y} accepted<extra></extra>"))
    misses = [(r.round, r.accepted_count) for r, out in zip(rounds, outside_at_miss, strict=True) if out]
    figure.add_trace(go.Scatter(x=[m[0] for m in misses], y=[m[1] + 0.3 for m in misses], mode="markers",
                                name="target's token outside the draft vocabulary",
                                marker=dict(symbol="x", size=10, color="#D55E00"),
                                hovertemplate="round %{x}: the target's token was not draftable<extra></extra>"))
    base_layout(figure, f"Draft-vocabulary coverage — {lane_name(trace, lane)}: {share:.1%} of committed target "
                        "tokens outside it", "round", "tokens", height=380)
    return figure


def training_curve_figure(record: dict) -> go.Figure:
    """A draft head's training record (train-drafter's training.json): loss and held-out top-1 agreement."""
    curve = record.get("curve") or []
    if not curve:
        return empty_figure("This head's record has no training curve.")
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    steps = [point["step"] for point in curve]
    figure.add_trace(go.Scatter(x=steps, y=[point["loss"] for point in curve], mode="lines+markers", name="loss",
                                line=dict(color=LANE_COLORS[0])), secondary_y=False)
    figure.add_trace(go.Scatter(x=steps, y=[point["agreement"] for point in curve], mode="lines+markers",
                                name="held-out top-1 agreement", line=dict(color=LANE_COLORS[1], dash="dash")),
                     secondary_y=True)
    base_layout(figure, f"Draft head training: {record.get('train_tokens', 0)} tokens, "
                        f"{record.get('vocab', 0)}-token draft vocabulary", "step", "loss", height=380)
    figure.update_yaxes(title_text="agreement", range=[0, 1], secondary_y=True)
    return figure
