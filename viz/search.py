"""Views of search strategies: the beam tree, contrastive candidates, momentum's token graph, cautious
branching, and the repetition rate every lane can be compared on."""

from __future__ import annotations

import html
from collections.abc import Sequence

import networkx as nx
import plotly.graph_objects as go

from explorer.events import BeamResult, BeamStep, CandidateStep, TrialBranch
from explorer.trace import Trace
from viz.labels import lane_name, show_token
from viz.theme import FIRST_DIVERGENCE, LANE_COLORS, SEQUENTIAL, base_layout, empty_figure, lane_color, legend_keys

STATUS_STYLE = {"kept": ("circle", "#0072B2"), "finished": ("star", "#E69F00"), "pruned": ("x", "#BBBBBB")}
ROOT = "root"


def _events(trace: Trace | None, kind: type) -> list:
    return [e for e in trace.events if isinstance(e, kind)] if trace is not None else []


def beam_tree(trace: Trace) -> nx.DiGraph:
    """Every candidate a beam search considered, as a tree rooted at the prompt. Node ids are
    'step:group:index'; attributes: step, group, token, text, score, status, finished_score, best (on an
    n-best path)."""
    graph = nx.DiGraph()
    graph.add_node(ROOT, step=-1, group=-1, text="<prompt>", score=0.0, status="kept", best=False)
    slot_nodes: dict[tuple[int, int, int], str] = {}  # (step, group, slot) -> node of the kept candidate
    for event in _events(trace, BeamStep):
        for i, token in enumerate(event.tokens):
            node = f"{event.step}:{event.group}:{i}"
            parent = ROOT if event.step == 0 else slot_nodes[(event.step - 1, event.group, event.parents[i])]
            graph.add_node(node, step=event.step, group=event.group, token=token, text=event.texts[i],
                           score=event.scores[i], status=event.statuses[i],
                           finished_score=event.finished_scores[i], best=False)
            graph.add_edge(parent, node)
            if event.statuses[i] == "kept":
                slot_nodes[(event.step, event.group, event.slots[i])] = node
    result = next(iter(_events(trace, BeamResult)), None)
    if result is not None:
        logprobs = result.logprobs or [None] * len(result.scores)
        for rank, (step, group, candidate) in enumerate(zip(result.end_steps, result.groups, result.end_candidates,
                                                             strict=True)):
            node = f"{step}:{group}:{candidate}"
            if node in graph:  # the n-best entry: its objective score and its plain model log-probability
                plain = "" if logprobs[rank] is None else f", model log p = {logprobs[rank]:.3f}"
                graph.nodes[node]["n_best"] = f"n-best #{rank + 1}: score {result.scores[rank]:.3f}{plain}"
            while node in graph:
                graph.nodes[node]["best"] = True
                node = next(iter(graph.predecessors(node)), None)
    return graph


def tree_layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Depth on x; on y, siblings in score order under their parent, parents in their own order (tidy and
    deterministic, no random spring layout)."""
    positions: dict[str, tuple[float, float]] = {ROOT: (0.0, 0.0)}
    order: dict[str, int] = {ROOT: 0}
    by_step: dict[int, list[str]] = {}
    for node, data in graph.nodes(data=True):
        if node != ROOT:
            by_step.setdefault(data["step"], []).append(node)
    for step in sorted(by_step):
        nodes = sorted(by_step[step], key=lambda n: (order[next(iter(graph.predecessors(n)))],
                                                       -graph.nodes[n]["score"]))
        for rank, node in enumerate(nodes):
            order[node] = rank
            positions[node] = (float(step + 1), -float(rank))
    return positions


def beam_tree_figure(trace: Trace | None, max_steps: int = 60, lane: int = 0) -> go.Figure:
    if trace is None or not _events(trace, BeamStep):
        return empty_figure("Run a beam or diverse_beam lane to see its search tree grow.")
    graph = beam_tree(trace)
    keep = [n for n, d in graph.nodes(data=True) if d["step"] < max_steps]
    graph = graph.subgraph(keep)
    positions = tree_layout(graph)
    figure = go.Figure()
    for best in (False, True):
        xs, ys = [], []
        for a, b in graph.edges:
            if graph.nodes[b]["best"] == best:
                xs += [positions[a][0], positions[b][0], None]
                ys += [positions[a][1], positions[b][1], None]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip",
                                    name="n-best path" if best else "expansion",
                                    line=dict(color="#D55E00" if best else "#CCCCCC", width=3 if best else 1)))
    groups = sorted({d["group"] for _, d in graph.nodes(data=True) if d["group"] >= 0})
    for status, (symbol, color) in STATUS_STYLE.items():
        nodes = [n for n, d in graph.nodes(data=True) if d["status"] == status and n != ROOT]
        if not nodes:
            continue
        colors = [lane_color(graph.nodes[n]["group"]) if len(groups) > 1 and status != "pruned" else color
                  for n in nodes]
        figure.add_trace(go.Scatter(
            x=[positions[n][0] for n in nodes], y=[positions[n][1] for n in nodes], mode="markers+text",
            name=status, marker=dict(symbol=symbol, size=11 if status != "pruned" else 7, color=colors),
            text=[show_token(graph.nodes[n]["text"], 6) if status != "pruned" else "" for n in nodes],
            textposition="middle right", textfont=dict(size=9),
            hovertext=[_node_hover(graph.nodes[n]) for n in nodes], hoverinfo="text",
        ))
    figure.add_trace(go.Scatter(x=[0], y=[0], mode="markers+text", text=["prompt"], name="prompt",
                                textposition="middle left", marker=dict(size=12, color="#000000"), hoverinfo="skip"))
    if len(groups) > 1:  # diverse beam: a key for each group's colour
        legend_keys(figure, [(f"group {g + 1}", lane_color(g), "circle") for g in groups])
    figure.update_yaxes(showticklabels=False)
    rows = max((-p[1] for p in positions.values()), default=1)
    return base_layout(figure, f"Beam tree — {lane_name(trace, lane)}", "step", "candidates (sibling order)",
                       height=int(min(1200, 260 + 22 * rows)))


def _node_hover(data: dict) -> str:
    text = f"step {data['step']} · {data['text']!r} · cumulative log p = {data['score']:.3f} · {data['status']}"
    if data["group"] >= 0:
        text += f" · group {data['group']}"
    if data.get("finished_score") is not None:
        text += f"<br>finished, score {data['finished_score']:.3f}"
    if data.get("n_best"):
        text += f"<br>{data['n_best']}"
    return text + ("<br>on an n-best path" if data.get("best") else "")


def contrastive_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    steps = [e for e in _events(trace, CandidateStep) if e.feature_name == "max cosine similarity"]
    if not steps:
        return empty_figure("Run a contrastive lane to see model probability against degeneration penalty.")
    figure = go.Figure()
    for chosen in (False, True):
        xs, ys, hover = [], [], []
        for step in steps:
            for i, token in enumerate(step.texts):
                if (i == step.chosen) == chosen:
                    xs.append(step.probs[i])
                    ys.append(step.features[i])
                    hover.append(f"step {step.step}: {token!r}, p={step.probs[i]:.3f}, "
                                 f"max cos={step.features[i]:.3f}, score={step.scores[i]:.3f}")
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="chosen" if chosen else "candidate",
                                    marker=dict(size=9 if chosen else 6, symbol="diamond" if chosen else "circle",
                                                color="#D55E00" if chosen else "#56B4E9"),
                                    hovertext=hover, hoverinfo="text"))
    return base_layout(figure, f"Contrastive search candidates — {lane_name(trace, lane)}", "model probability p(v)",
                       "max cos(h_v, context)", height=420)  # the penalty; a short title is never clipped


def momentum_graph(trace: Trace) -> nx.DiGraph:
    """Tokens as nodes, transitions as edges (prompt included); `revisit` marks edges into a node the walk had
    already visited, with the loop length and resistance paid."""
    steps = {e.step: e for e in _events(trace, CandidateStep) if e.feature_name == "loop length"}
    graph = nx.DiGraph()
    tokens = [(t, None) for t in trace.started.prompt_ids] + [(s.token_id, s) for s in trace.token_steps]
    previous = None
    for token, step in tokens:
        revisit = token in graph
        if not revisit:
            graph.add_node(token, text=step.token_text if step else trace.token_text(token), first=step is not None)
        if previous is not None:
            event = steps.get(step.step) if step else None
            data = graph.get_edge_data(previous, token) or {"count": 0, "penalty": 0.0, "loop": 0}
            data["count"] += 1
            if event is not None:
                data["penalty"] = max(data["penalty"], event.penalties[event.chosen])
                data["loop"] = max(data["loop"], int(event.features[event.chosen]))
            data["revisit"] = data.get("revisit", False) or (revisit and step is not None)
            graph.add_edge(previous, token, **data)
        previous = token
    return graph


def momentum_figure(trace: Trace | None, max_nodes: int = 120, lane: int = 0) -> go.Figure:
    if trace is None or not any(e.feature_name == "loop length" for e in _events(trace, CandidateStep)):
        return empty_figure("Run a momentum lane to see its token graph and loop penalties.")
    graph = momentum_graph(trace)
    nodes = list(graph.nodes)[:max_nodes]
    graph = graph.subgraph(nodes)
    # The walk left to right in first-visit order, on three staggered rows so that labels do not collide; a
    # loop is an edge back to the left.
    positions = {n: (float(i), -float(i % 3)) for i, n in enumerate(nodes)}
    figure = go.Figure()
    for revisit, color, name in ((False, "#CCCCCC", "transition"), (True, "#D55E00", "revisit (loop)")):
        xs, ys = [], []
        for a, b, data in graph.edges(data=True):
            if bool(data.get("revisit")) == revisit:
                xs += [positions[a][0], positions[b][0], None]
                ys += [positions[a][1], positions[b][1], None]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, hoverinfo="skip",
                                    line=dict(color=color, width=2 if revisit else 1)))
    penalties = {b: d["penalty"] for _, b, d in graph.edges(data=True)}
    figure.add_trace(go.Scatter(
        x=[positions[n][0] for n in nodes], y=[positions[n][1] for n in nodes], mode="markers+text",
        text=[show_token(graph.nodes[n]["text"], 6) for n in nodes], textfont=dict(size=9), name="token",
        marker=dict(size=8, color=["#0072B2" if graph.nodes[n]["first"] else "#999999" for n in nodes]),
        hovertext=[f"{graph.nodes[n]['text']!r} · in-degree {graph.in_degree(n)} · max resistance paid "
                   f"{penalties.get(n, 0.0):.2f}" for n in nodes], hoverinfo="text",
    ))
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False, range=[-2.8, 0.8])
    return base_layout(figure, f"Momentum decoding: token graph in visit order — {lane_name(trace, lane)}", "", "",
                       height=360)


def cautious_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    branches = _events(trace, TrialBranch)
    if not branches:
        return empty_figure("Run a cautious lane (on a prompt uncertain enough to branch, or with a lower "
                            "h_min) to see its branching.")
    figure = go.Figure()
    for chosen in (False, True):
        xs, ys, hover = [], [], []
        for branch in branches:
            for i, (ppl, text) in enumerate(zip(branch.perplexities, branch.trial_texts, strict=True)):
                if (i == branch.chosen) == chosen:
                    xs.append(branch.step)
                    ys.append(ppl)
                    hover.append(f"step {branch.step} (entropy {branch.entropy:.2f}): {text!r} perplexity {ppl:.2f}")
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="chosen trial" if chosen else "trial",
                                    marker=dict(size=11 if chosen else 7, symbol="star" if chosen else "circle",
                                                color="#D55E00" if chosen else "#56B4E9"),
                                    hovertext=hover, hoverinfo="text"))
    figure.update_yaxes(type="log")
    return base_layout(figure, f"Cautious decoding: trials at uncertain steps — {lane_name(trace, lane)}", "step",
                       "trial perplexity")


def repetition_figure(traces: Sequence[Trace]) -> go.Figure:
    """Repeated n-gram rate (1 - distinct / total n-grams of the output) per lane, n = 2, 3, 4."""
    lanes = [(i, t) for i, t in enumerate(traces) if t is not None and len(t.token_steps) > 1]
    if not lanes:
        return empty_figure("Run some lanes to compare their repetition.")
    figure = go.Figure()
    for index, trace in lanes:
        rates = [trace.repetition_rate(n) for n in (2, 3, 4)]
        figure.add_trace(go.Bar(x=["2-grams", "3-grams", "4-grams"], y=rates, name=lane_name(trace, index),
                                marker_color=lane_color(index), hovertemplate="%{x}: %{y:.1%} repeated"))
    figure.update_layout(barmode="group")
    figure.update_yaxes(tickformat=".0%", range=[0, 1])
    return base_layout(figure, "Repetition: share of the output's n-grams that repeat an earlier one", "n-gram",
                       "repeated n-gram rate")


def mbr_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """MBR: the candidate × candidate utility matrix (chrF of row against column), and each candidate's expected
    utility next to its log-probability; the chosen candidate, the best by log-probability and greedy marked."""
    result = next((e for e in trace.events if e.kind == "mbr_result"), None) if trace is not None else None
    if result is None:
        return empty_figure("Run an mbr lane to see its candidates' utility matrix.")
    from plotly.subplots import make_subplots

    labels = [f"{i}{' ★' if i == result.chosen else ''}{' (max log p)' if i == result.best_by_logprob else ''}"
              for i in range(len(result.texts))]
    figure = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.22,
                           subplot_titles=("utility u(row, column): chrF", "expected utility vs log-probability"))
    hover = [[f"{html.escape(show_token(result.texts[i], 40))} vs {html.escape(show_token(result.texts[j], 40))}: "
              f"{result.utilities[i][j]:.1f}" for j in range(len(result.texts))] for i in range(len(result.texts))]
    off_diagonal = [[None if i == j else u for j, u in enumerate(row)] for i, row in enumerate(result.utilities)]
    figure.add_trace(go.Heatmap(z=off_diagonal, x=labels, y=labels, colorscale=SEQUENTIAL, hovertext=hover,
                                hoverinfo="text", colorbar=dict(title="chrF", x=0.41)), row=1, col=1)
    colors = [FIRST_DIVERGENCE if i == result.chosen else LANE_COLORS[0] for i in range(len(result.texts))]
    marked = [label if label != str(i) else "" for i, label in enumerate(labels)]  # only the chosen and max log p
    figure.add_trace(go.Scatter(x=result.logprobs, y=result.expected, mode="markers+text", text=marked,
                                textposition="top center", marker=dict(size=11, color=colors), showlegend=False,
                                hovertext=[html.escape(show_token(t, 60)) for t in result.texts], hoverinfo="text"),
                     row=1, col=2)
    if result.greedy_ids:
        figure.add_vline(x=result.greedy_logprob, line=dict(dash="dot", color="#666666"), row=1, col=2,
                         annotation_text="greedy log p", annotation_position="bottom right")
    base_layout(figure, f"MBR over {len(result.texts)} samples — {lane_name(trace, lane)} (★ chosen)", "", "",
                height=480)
    figure.update_yaxes(autorange="reversed", row=1, col=1)
    figure.update_xaxes(title_text="log-probability (sum)", row=1, col=2)
    figure.update_yaxes(title_text="expected utility", row=1, col=2)
    return figure


def first_finish_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """First-finish search: each raced sample's length when the race stopped, the winner (the first to finish)
    highlighted, finished samples with their finishing place."""
    race = next((e for e in trace.events if e.kind == "finish_race"), None) if trace is not None else None
    if race is None:
        return empty_figure("Run a first_finish lane to see its race.")
    places = {row: place + 1 for place, row in enumerate(race.finish_order)}
    labels = [f"sample {i}" for i in range(len(race.samples))]
    colors = [FIRST_DIVERGENCE if i == race.chosen else LANE_COLORS[0] if race.finished[i] else "#BBBBBB"
              for i in range(len(race.samples))]
    notes = [f"finished {places[i]}{'st' if places[i] == 1 else 'th'}" if i in places else "still running"
             for i in range(len(race.samples))]
    figure = go.Figure(go.Bar(x=race.lengths, y=labels, orientation="h", marker=dict(color=colors), text=notes,
                              textposition="outside", showlegend=False,
                              hovertext=[f"{html.escape(show_token(t, 80))}<br>log p {lp:.2f}"
                                         for t, lp in zip(race.texts, race.logprobs, strict=True)],
                              hoverinfo="text"))
    figure.update_yaxes(autorange="reversed")
    return base_layout(figure, f"First-finish race — {lane_name(trace, lane)}: kept sample {race.chosen} "
                               f"({html.escape(race.reason)})", "tokens when the race stopped", "",
                       height=max(260, 40 * len(race.samples) + 140))


def exact_extract_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """exact-extract: log P of every span (rows: where it starts in the prompt, columns: its length), the best
    span marked, and the free greedy answer in the title for comparison."""
    spans = next((e for e in trace.events if e.kind == "extract_spans"), None) if trace is not None else None
    if spans is None:
        return empty_figure("Run an exact_extract lane to see its span probabilities.")
    z = [[None if v == float("-inf") else v for v in row] for row in spans.log_probs]
    starts = [f"{p}" for p in spans.starts]
    figure = go.Figure(go.Heatmap(z=z, x=list(range(1, len(z[0]) + 1)) if z else [], y=starts,
                                  colorscale=SEQUENTIAL, colorbar=dict(title="log P"),
                                  hovertemplate="start %{y}, length %{x}: log P %{z:.2f}<extra></extra>"))
    row = spans.starts.index(spans.best_start)
    figure.add_trace(go.Scatter(x=[spans.best_length], y=[starts[row]], mode="markers", name="best span",
                                marker=dict(symbol="star", size=16, color=FIRST_DIVERGENCE)))
    title = (f"exact-extract — {lane_name(trace, lane)}: best span {html.escape(show_token(spans.best_text, 30))!s} "
             f"vs greedy {html.escape(show_token(spans.greedy_text, 30))!s}")
    figure.update_yaxes(autorange="reversed", type="category")
    return base_layout(figure, title, "span length (tokens)", "start position in the prompt",
                       height=min(900, 200 + 14 * len(starts)))


def instructive_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """Instructive decoding: per step, the chosen token's rank under the real instruction alone (0 = what
    greedy would have taken); steps where the noisy-instruction contrast flipped the choice are highlighted."""
    if trace is None or not trace.has_step_detail("flipped"):
        return empty_figure("Run an instructive lane to see where the noisy-instruction contrast changed a token.")
    steps = trace.token_steps
    flipped = [s.details.get("flipped", 0.0) > 0 for s in steps]
    hover = [f"step {s.step}: {html.escape(show_token(s.token_text))} (rank {s.rank} under the instruction alone; "
             f"its top-1 was {html.escape(show_token(trace.token_text(int(s.details.get('plain_top', -1)))))})"
             for s in steps]
    figure = go.Figure(go.Bar(x=[s.step for s in steps], y=[s.rank for s in steps],
                              marker=dict(color=[FIRST_DIVERGENCE if f else LANE_COLORS[0] for f in flipped]),
                              hovertext=hover, hoverinfo="text", showlegend=False))
    eps = trace.started.config.get("epsilon")
    return base_layout(figure, f"Instructive decoding — {lane_name(trace, lane)}: {sum(flipped)} of {len(steps)} "
                               f"tokens flipped by the contrast (ε = {eps})", "step",
                       "chosen token's rank without the contrast")


def lattice_graph(result: object) -> nx.DiGraph:
    """The lattice as a networkx graph: nodes with token text and position, edges with log p and `merged`."""
    graph = nx.DiGraph()
    for node, (text, depth) in enumerate(zip(result.texts, result.depths, strict=True)):
        graph.add_node(node, text=text, depth=depth)
    for source, target, logp, merged in zip(result.edge_from, result.edge_to, result.edge_logprobs,
                                            result.edge_merged, strict=True):
        graph.add_edge(source, target, logp=logp, merged=merged)
    return graph


def lattice_figure(trace: Trace | None, lane: int = 0, max_nodes: int = 400) -> go.Figure:
    """Lattice decoding: nodes by position (x) in order of discovery (y), edges found by search in grey, merge
    edges (recombination) dashed, the chosen path and the greedy path drawn over them."""
    result = next((e for e in trace.events if e.kind == "lattice_result"), None) if trace is not None else None
    if result is None:
        return empty_figure("Run a lattice lane to see its lattice.")
    graph = lattice_graph(result)
    rows: dict[int, int] = {}
    position: dict[int, tuple[float, float]] = {}
    for node in sorted(graph.nodes)[:max_nodes]:
        depth = graph.nodes[node]["depth"]
        position[node] = (float(depth), -float(rows.get(depth, 0)))
        rows[depth] = rows.get(depth, 0) + 1
    figure = go.Figure()
    chosen = set(zip([0, *result.chosen], result.chosen, strict=False))
    greedy = set(zip([0, *result.greedy], result.greedy, strict=False))
    styles = (("search edge", lambda e, m: not m, dict(color="#CCCCCC", width=1)),
              ("merge edge (recombination)", lambda e, m: m, dict(color="#E69F00", width=1.5, dash="dash")),
              ("greedy path", lambda e, m: e in greedy, dict(color="#999999", width=3, dash="dot")),
              ("chosen path", lambda e, m: e in chosen, dict(color=LANE_COLORS[0], width=3.5)))
    for name, wanted, line in styles:
        xs, ys = [], []
        for a, b, data in graph.edges(data=True):
            if a in position and b in position and wanted((a, b), data["merged"]):
                xs += [position[a][0], position[b][0], None]
                ys += [position[a][1], position[b][1], None]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, line=line, hoverinfo="skip"))
    nodes = sorted(position)
    terminal = set(result.terminal)
    figure.add_trace(go.Scatter(
        x=[position[n][0] for n in nodes], y=[position[n][1] for n in nodes], mode="markers+text",
        text=[html.escape(show_token(graph.nodes[n]["text"], 8)) if n else "prompt" for n in nodes],
        textposition="top center",
        textfont=dict(size=9), name="token", marker=dict(size=8, color=["#D55E00" if n in terminal else "#56B4E9"
                                                                        for n in nodes]),
        hovertext=[f"{html.escape(show_token(graph.nodes[n]['text'], 30))} at position {graph.nodes[n]['depth']}"
                   f"{' (end)' if n in terminal else ''}" for n in nodes], hoverinfo="text"))
    figure.update_yaxes(visible=False)
    height = int(min(900, 280 + 24 * max(rows.values(), default=1)))
    return base_layout(figure, f"Lattice — {lane_name(trace, lane)}: {result.path_count} distinct paths from "
                               f"{len(result.tokens) - 1} nodes, {result.merges} merges", "position", "",
                       height=height)


def superposed_figure(trace: Trace | None, lane: int = 0) -> go.Figure:
    """Superposed decoding: each step's superposition weights (one bar segment per draft), and the k·n
    candidates by combined score, kept ones filled, with the model's and the n-gram filter's log-probabilities
    in the hover; the final drafts are listed in the legend."""
    steps = [e for e in trace.events if e.kind == "superposed_step"] if trace is not None else []
    result = next((e for e in trace.events if e.kind == "superposed_result"), None) if trace is not None else None
    if not steps or result is None:
        return empty_figure("Run a superposed lane to see its drafts, weights and candidates.")
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.35, 0.65],
                           subplot_titles=("superposition weights γ (one segment per draft)",
                                           "k·n candidates: combined score (filled = kept)"))
    width = max(len(s.weights) for s in steps)
    for slot in range(width):
        figure.add_trace(go.Bar(x=[s.step for s in steps], y=[s.weights[slot] if slot < len(s.weights) else 0
                                                             for s in steps],
                                marker_color=lane_color(slot), name=f"draft slot {slot + 1}", showlegend=False,
                                hovertemplate="step %{x}: γ = %{y:.3f}<extra>slot " + str(slot + 1) + "</extra>"),
                         row=1, col=1)
    for kept, symbol in ((False, "circle-open"), (True, "circle")):
        xs, ys, hover = [], [], []
        for s in steps:
            chosen = set(s.kept)
            for index, score in enumerate(s.scores):
                if (index in chosen) == kept:
                    xs.append(s.step)
                    ys.append(score)
                    hover.append(f"draft {s.candidate_drafts[index] + 1} + "
                                 f"{html.escape(show_token(s.candidate_texts[index], 20))}: model log p "
                                 f"{s.model_logprobs[index]:.2f}, n-gram log P {s.ngram_logprobs[index]:.2f}")
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="kept" if kept else "dropped",
                                    marker=dict(symbol=symbol, size=8, color=LANE_COLORS[0] if kept else "#999999"),
                                    hovertext=hover, hoverinfo="text"), row=2, col=1)
    for rank, text in enumerate(result.texts):
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(color=lane_color(rank)),
                                    name=f"{'★ ' if rank == result.chosen else ''}{html.escape(show_token(text, 40))}"))
    figure.update_layout(barmode="stack")
    base_layout(figure, f"Superposed decoding — {lane_name(trace, lane)}: {len(result.texts)} drafts from one pass "
                        "per step", "", "", height=520)
    figure.update_yaxes(title_text="γ", row=1, col=1)
    figure.update_yaxes(title_text="score (log)", row=2, col=1)
    figure.update_xaxes(title_text="step", row=2, col=1)
    return figure
