"""What if / why: the logit lens, the attention dependency graph, the branch tree, and why two lanes parted.
Pure functions of recorded traces (nothing is re-run)."""

from __future__ import annotations

import html
import math
import textwrap
from collections import Counter
from collections.abc import Sequence

import networkx as nx
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.branch import branch_tree
from explorer.trace import Trace
from viz.figures import first_divergence
from viz.labels import lane_name
from viz.theme import SEQUENTIAL, base_layout, empty_figure, lane_color


def _records(trace: Trace | None, kind: str) -> list:
    return [e for e in trace.events if e.kind == kind] if trace is not None else []


def _short(text: str, limit: int = 12) -> str:
    text = text.replace("\n", "↵")
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -------------------------------------------------------------------------------------------- logit lens
def first_top1_layer(record) -> int | None:
    """The first layer at which the finally chosen token is the lens's top-1 (None: never, not even the last)."""
    return next((layer for layer, rank in enumerate(record.chosen_ranks) if rank == 0), None)


def logit_lens_figure(trace: Trace | None, lane: int = 0, max_steps: int = 200) -> go.Figure:
    """Layer x step: colour = probability of the token finally chosen at that step, read at each layer through
    the final norm and the LM head; the line marks the first layer where it is already the top-1. For a
    layer-skip draft (self_speculative), the layers its most used skip set leaves out are shaded: a draft that
    skips the layers where the token only emerges late cannot agree."""
    records = _records(trace, "lens_step")[:max_steps]
    if not records:
        return empty_figure("Turn on 'record logit lens' and run to see each layer's guess at every step.")
    layers = len(records[0].chosen_probs)
    steps = [r.step for r in records]
    z = [[r.chosen_probs[layer] for r in records] for layer in range(layers)]
    hover = [[f"step {r.step}, layer {layer}: P({html.escape(_short(trace.token_steps[i].token_text))}) = "
              f"{r.chosen_probs[layer]:.3f}, rank {r.chosen_ranks[layer]}<br>layer top-5: "
              + ", ".join(f"{html.escape(_short(t))} {p:.2f}" for t, p in zip(r.top_texts[layer], r.top_probs[layer],
                                                                              strict=False))
              for i, r in enumerate(records)] for layer in range(layers)]
    figure = go.Figure(go.Heatmap(x=steps, y=list(range(layers)), z=z, zmin=0, zmax=1, colorscale=SEQUENTIAL,
                                  text=hover, hoverinfo="text", colorbar=dict(title="P(chosen)")))
    first = [first_top1_layer(r) for r in records]
    figure.add_trace(go.Scatter(x=steps, y=[layers - 0.5 if f is None else f for f in first], mode="lines+markers",
                                line=dict(color="#D55E00", width=2), marker=dict(size=5), name="first layer at top-1",
                                hovertemplate="step %{x}: top-1 from layer %{y}<extra></extra>"))
    skipped = _common_skip_set(trace)
    for layer in skipped:
        figure.add_hrect(y0=layer - 0.5, y1=layer + 0.5, line_width=0, fillcolor="#CC79A7", opacity=0.18)
    note = f"; shaded: the {len(skipped)} layers its draft skipped most" if skipped else ""
    base_layout(figure, f"Logit lens — {lane_name(trace, lane)}{note}", "step", "layer",
                height=max(300, 24 * layers + 140))
    return figure


def _common_skip_set(trace: Trace) -> list[int]:
    sets = Counter(str(r.details["skipped_layers"]) for r in trace.rounds if r.details.get("skipped_layers"))
    if not sets:
        return []
    return sorted(int(x) for x in sets.most_common(1)[0][0].split(",") if x.strip())


# ----------------------------------------------------------------------------------------- attention graph
def attention_graph(trace: Trace, min_weight: float = 0.0) -> nx.DiGraph:
    """Positions as nodes (prompt and generated tokens, with their text), an edge source -> token for each
    recorded attended position with its weight, and `copied` on edges into tokens that came from an accepted
    draft (prompt lookup copies a span: those tokens should lean on their source)."""
    graph = nx.DiGraph()
    steps = {s.position: s for s in trace.token_steps}
    records = _records(trace, "attention_step")
    texts = {source: text for r in records for source, text in zip(r.sources, r.source_texts, strict=True)}
    texts |= {s.position: s.token_text for s in trace.token_steps}
    for record in records:
        step = steps.get(record.position)
        graph.add_node(record.position, text=texts.get(record.position, ""), generated=True)
        for source, weight in zip(record.sources, record.weights, strict=True):
            if weight < min_weight:
                continue
            graph.add_node(source, text=texts.get(source, ""), generated=source in steps)
            graph.add_edge(source, record.position, weight=weight,
                           copied=step is not None and step.origin == "draft")
    return graph


def attention_graph_figure(trace: Trace | None, lane: int = 0, max_tokens: int = 60) -> go.Figure:
    """Which earlier tokens each generated token leaned on: prompt tokens on the lower row, generated ones on
    the upper, both by position; edge width = attention weight; orange edges go into tokens copied as accepted
    drafts. Hover a generated token for its sources (the per-token drill-down)."""
    if not _records(trace, "attention_step"):
        return empty_figure("Turn on 'record attention' and run to see which tokens each token leaned on.")
    graph = attention_graph(trace)
    generated = sorted(n for n, d in graph.nodes(data=True) if d["generated"])[:max_tokens]
    keep = set(generated) | {s for g in generated for s in graph.predecessors(g)}
    graph = graph.subgraph(keep)
    y = {n: 1.0 if d["generated"] else 0.0 for n, d in graph.nodes(data=True)}
    figure = go.Figure()
    top = max((d["weight"] for _, _, d in graph.edges(data=True)), default=1.0) or 1.0
    for source, target, data in sorted(graph.edges(data=True), key=lambda e: e[2]["weight"]):
        figure.add_trace(go.Scatter(
            # arcs between generated tokens bow down, under the row, clear of its labels
            x=[source, (source + target) / 2, target],
            y=[y[source], (y[source] + y[target]) / 2 + (-0.25 if y[source] else 0.25), y[target]],
            mode="lines", line=dict(width=0.5 + 5 * data["weight"] / top, shape="spline",
                                    color="#E69F00" if data["copied"] else "rgba(0,114,178,0.45)"),
            hoverinfo="skip", showlegend=False))
    nodes = sorted(graph.nodes)
    hover = []
    for n in nodes:
        text = html.escape(_short(graph.nodes[n]["text"], 20))
        sources = sorted(graph.in_edges(n, data=True), key=lambda e: -e[2]["weight"])
        lines = "<br>".join(f"← {html.escape(_short(graph.nodes[s]['text']))} (pos {s}) {d['weight']:.2f}"
                            for s, _, d in sources[:8])
        hover.append(f"pos {n}: {text}" + (f"<br>{lines}" if lines else ""))
    figure.add_trace(go.Scatter(x=nodes, y=[y[n] for n in nodes], mode="markers", hovertext=hover, hoverinfo="text",
                                showlegend=False,
                                marker=dict(size=9, color=["#333333" if y[n] else "#0072B2" for n in nodes])))
    for n in nodes:  # labels slanted (generated above their row, prompt below) so that neighbours never overlap
        above = bool(y[n])
        figure.add_annotation(x=n, y=y[n], text=html.escape(_short(graph.nodes[n]["text"], 10)), showarrow=False,
                              textangle=-60, xanchor="left" if above else "right", yanchor="bottom" if above else "top",
                              yshift=6 if above else -6, font=dict(size=10))
    figure.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="#E69F00", width=3),
                                name="into a copied (accepted draft) token"))
    figure.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="rgba(0,114,178,0.6)", width=3),
                                name="attention (width = weight)"))
    probes = trace.started.probes.get("attention", {})
    layers = probes.get("layers", [])
    span = f"layers {layers[0]}-{layers[1]}" if len(layers) == 2 else "all layers"
    base_layout(figure, f"Attention dependencies — {lane_name(trace, lane)} ({span}, mean over heads)", "position",
                "", height=420)
    figure.update_yaxes(tickvals=[0, 1], ticktext=["prompt", "generated"], range=[-1.0, 2.0])
    return figure


# ------------------------------------------------------------------------------------------- branch tree
STORED_GREY = "#9a9a9a"  # a family's runs that are not open in a lane

def branch_tree_figure(traces: Sequence[Trace], family: Sequence[Trace] = ()) -> go.Figure:
    """The lanes' runs as a tree of branches: each run a line from the step where it left its parent to its
    end, joined to the parent there; labelled with its text after the fork and its mean log-probability.
    `family`: stored runs of the same branch families that are not open in a lane (drawn grey, by run id)."""
    traces = [t for t in traces if t is not None and t.token_steps]
    shown = {t.run_id for t in traces}
    others = [t for t in family if t is not None and t.token_steps and t.run_id not in shown]
    roots = branch_tree([*traces, *others])
    if not any(root.children for root in roots):
        return empty_figure("Branch from a token (the 'what if' panel) to grow a tree of runs here.")
    figure = go.Figure()
    rows: list[tuple] = []

    def walk(node, depth: int, parent_row: int | None) -> None:
        row = len(rows)
        rows.append((node, parent_row))
        for child in node.children:
            walk(child, depth + 1, row)

    for root in roots:
        walk(root, 0, None)
    lanes = {t.run_id: i for i, t in enumerate(traces)}
    for row, (node, parent_row) in enumerate(rows):
        trace = node.trace
        start = node.step if parent_row is not None and node.step is not None else 0
        end = len(trace.token_steps) - 1
        lane = lanes.get(trace.run_id)
        color = lane_color(lane) if lane is not None else STORED_GREY
        tail = trace.text if parent_row is None else "".join(s.token_text for s in trace.token_steps[start:])
        name = lane_name(trace, lane) if lane is not None else f"run {trace.run_id[:8]}: {trace.started.strategy}"
        label = f"{name}: mean log p {node.mean_logprob:.2f}"
        figure.add_trace(go.Scatter(x=[start, end], y=[-row, -row], mode="lines+markers", name=label,
                                    line=dict(color=color, width=4), marker=dict(size=8),
                                    hovertext=f"{html.escape(label)}<br>{html.escape(_short(tail, 80))}",
                                    hoverinfo="text"))
        figure.add_annotation(x=end, y=-row, text=html.escape(_short(tail.strip(), 40)), showarrow=False,
                              xanchor="left", font=dict(size=11))
        if parent_row is not None:
            forced = trace.token_steps[start].token_text if start < len(trace.token_steps) else ""
            figure.add_trace(go.Scatter(x=[start, start], y=[-parent_row, -row], mode="lines",
                                        line=dict(color=color, dash="dot"), showlegend=False,
                                        hovertext=f"branch at step {start}: {html.escape(_short(forced))}",
                                        hoverinfo="text"))
    title = f"Branch tree ({len(rows)} runs" + (f"; {len(others)} stored, not open: grey)" if others else ")")
    base_layout(figure, title, "step", "", height=max(260, 70 * len(rows) + 140))
    figure.update_yaxes(showticklabels=False)
    return figure


# ----------------------------------------------------------------------------------- why two lanes parted
def why_chosen(trace: Trace, index: int) -> str:
    """In words, from the recorded events: why this lane committed its token at step `index`."""
    step = trace.token_steps[index]
    started = trace.started
    config, name = started.config, started.strategy
    kept_p = math.exp(step.kept_logprob)
    if step.origin == "forced":
        return "forced: the branch chose this token instead of its parent's"
    if step.origin == "prefix":
        return "copied from the parent run (before the branch point)"
    if step.origin == "draft":
        why = ("the target agreed: it is its argmax" if config.get("rule", "greedy") == "greedy" else
               "accepted: p/q was at least the uniform draw")
        return f"an accepted draft token ({why}), raw rank {step.rank}"
    if step.origin == "bonus":
        return f"the target's own token after a verification round (raw rank {step.rank})"
    if name in ("beam", "diverse_beam"):
        return ("the best beam hypothesis has this token here" + (
            f": rank {step.rank} at this step, kept because the sequence's total log-probability is higher"
            if step.rank else " (also the step's argmax)"))
    if name == "greedy" or step.kept_count == 1:
        return f"the argmax (rank {step.rank}, p = {math.exp(step.logprob):.3f})"
    cut = []
    if name == "mirostat" and "mu" in step.details:
        cut.append(f"Mirostat's mu = {step.details['mu']:.2f} truncated to {step.kept_count} tokens")
    elif name == "top_h":
        cut.append(f"Top-H kept {step.kept_count} tokens under its entropy bound")
    else:
        for key, label in (("top_k", "top-k"), ("top_p", "top-p"), ("min_p", "min-p"), ("typical_p", "typical-p")):
            value = config.get(key)
            if value not in (None, 0, 1, 1.0, 0.0):
                cut.append(f"{label} {value}")
        cut = [f"{', '.join(cut)} kept {step.kept_count} tokens"] if cut else [f"{step.kept_count} tokens kept"]
    temperature = config.get("temperature")
    heat = f" at temperature {temperature}" if temperature not in (None, 1, 1.0) else ""
    return f"sampled{heat}: {cut[0]}; this one was raw rank {step.rank} with kept probability {kept_p:.3f}"


def divergence_why_figure(traces: Sequence[Trace], lane: int = 1) -> go.Figure:
    """Lane 1 and the chosen lane (lane 2 when lane 1 is chosen) at their first divergence: both lanes'
    recorded top-k there side by side (the token each chose in orange), the probability margin, and the rule
    that made each choose."""
    traces = [t for t in traces if t is not None and t.token_steps]
    if len(traces) < 2:
        return empty_figure("Run two or more lanes on one prompt to see why they parted.")
    other = lane if 0 < lane < len(traces) else 1
    first, second = traces[0], traces[other]
    found = first_divergence(first, second)
    if found is None:
        return empty_figure(f"Lanes 1 and {other + 1} agree on every token they share.")
    index = next(i for i, s in enumerate(first.token_steps) if s.step == found.step)
    figure = make_subplots(rows=1, cols=2, subplot_titles=(lane_name(first, 0), lane_name(second, other)))
    for col, (trace, number) in enumerate(((first, 0), (second, other)), start=1):
        step = trace.token_steps[index]
        ids = step.kept_top_ids or step.top_ids
        logps = step.kept_top_logprobs if step.kept_top_ids else step.top_logprobs
        texts = [trace.token_text(t) for t in ids]
        figure.add_trace(go.Bar(x=[math.exp(v) for v in logps][::-1], y=[f"{_short(t)} ({i})" for t, i in
                                                                        zip(texts, ids, strict=True)][::-1],
                                orientation="h", showlegend=False,
                                marker_color=["#D55E00" if i == step.token_id else lane_color(number)
                                              for i in ids][::-1],
                                hovertemplate="%{y}: %{x:.3f}<extra></extra>"), row=1, col=col)
    margin = f"{found.margin:.3f}" if found.margin is not None else "beyond the recorded top-k"
    title = (f"Why lanes 1 and {other + 1} parted at step {found.step}: {html.escape(_short(found.reference_token))!s}"
             f" vs {html.escape(_short(found.lane_token))} (margin in lane 1's distribution: {margin})")
    base_layout(figure, title, "probability (the distribution each lane drew from)", "", height=420)
    for col, (trace, number) in enumerate(((first, 0), (second, other)), start=1):
        words = "<br>".join(textwrap.wrap(f"lane {number + 1}: {why_chosen(trace, index)}", 58))
        figure.add_annotation(text=html.escape(words).replace("&lt;br&gt;", "<br>"), showarrow=False,
                              xref=f"x{'' if col == 1 else col} domain", yref="paper", x=0, y=-0.3, xanchor="left",
                              yanchor="top", align="left", font=dict(size=11))
    figure.update_xaxes(title_text="", col=2)  # one axis title for both panels (they would overlap when narrow)
    figure.update_layout(margin=dict(b=150), height=460)
    return figure
