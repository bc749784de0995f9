"""Views of draft-verify runs: per-round acceptance, accepted lengths, per-position acceptance, draft vs verify
time, layer-skip agreement, and Jacobi's iteration x position grid with its convergence dependency graph."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.engines import acceptance_histogram, marginal_rate_by_position
from explorer.trace import Trace
from explorer.trees import tree_depths
from viz.labels import lane_name, show_token
from viz.theme import base_layout, empty_figure, lane_color, legend_keys

VERDICT_VALUE = {"accepted": 1.0, "rejected": 0.0}
ACCEPTED, REJECTED, UNREACHED = "#0072B2", "#D55E00", "#DDDDDD"


def _has_rounds(trace: Trace | None) -> bool:
    return trace is not None and bool(trace.rounds)


def _speculative(trace: Trace | None) -> bool:
    """Our draft rounds, or an engine's record of them (an imported run)."""
    return _has_rounds(trace) or (trace is not None and trace.engine_record is not None
                                  and bool(trace.engine_record.steps))


def _engine_name(trace: Trace) -> str:
    return str(trace.started.tags.get("external", "the engine"))


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def acceptance_heatmap(trace: Trace | None, max_rounds: int = 150, lane: int = 0) -> go.Figure:
    """Round x draft position: accepted (blue), rejected (red), not reached (grey); hover gives p, q, u. An
    imported engine record: per step as reported (a chain: accepted, then the first rejected, then not reached;
    no tokens), where the engine reports per-step counts."""
    if trace is not None and not _has_rounds(trace) and trace.engine_record is not None:
        return _reported_rounds(trace, max_rounds, lane)
    if not _has_rounds(trace):
        return empty_figure("Run a draft-verify strategy (speculative, prompt_lookup, jacobi, ...) to see rounds.")
    rounds = trace.rounds[:max_rounds]
    width = max(max(tree_depths(r.parents), default=0) + 1 for r in rounds)
    z = [[None] * width for _ in rounds]
    hover = [[""] * width for _ in rounds]
    for row, round_ in enumerate(rounds):
        for i, depth in enumerate(tree_depths(round_.parents)):
            verdict = round_.verdicts[i]
            if z[row][depth] is None or verdict == "accepted":
                z[row][depth] = VERDICT_VALUE.get(verdict, 0.5)
                hover[row][depth] = (f"round {round_.round}, position {depth}: {round_.draft_texts[i]!r} {verdict}"
                                     f"<br>p = {_fmt(round_.p[i])}, q = {_fmt(round_.q[i])}, u = {_fmt(round_.u[i])}")
    return _verdict_heatmap(z, hover, [r.round for r in rounds], f"Acceptance per round — {lane_name(trace, lane)}")


def _reported_rounds(trace: Trace, max_rounds: int, lane: int) -> go.Figure:
    record = trace.engine_record
    engine = _engine_name(trace)
    accepted = record.per_step_accepted[:max_rounds]
    if not accepted:
        return empty_figure(f"{engine} reported totals only for this request (no per-step acceptance): see the "
                            "accepted-lengths and per-position views.")
    drafted = record.per_step_depth[:max_rounds] or record.per_step_drafted[:max_rounds]
    width = max([*drafted, *(a + 1 for a in accepted)], default=1)
    z = [[None] * width for _ in accepted]
    hover = [[""] * width for _ in accepted]
    for row, a in enumerate(accepted):
        # a chain: accepted up to a, then rejected, then not reached; without the drafted counts, the position
        # after the accepted ones is "rejected or not drafted" and nothing is drawn past it
        drawn = drafted[row] if drafted else a + 1
        for depth in range(drawn):
            verdict = ("accepted" if depth < a else "unreached" if depth > a
                       else "rejected" if drafted else "rejected or not drafted")
            z[row][depth] = VERDICT_VALUE.get(verdict, 0.0 if verdict.startswith("rejected") else 0.5)
            hover[row][depth] = f"step {row}, position {depth}: {verdict} (as {engine} reported it; no tokens)"
    return _verdict_heatmap(z, hover, list(range(len(accepted))),
                            f"Acceptance per step, as {engine} reported it — {lane_name(trace, lane)}")


def _verdict_heatmap(z: list[list[float | None]], hover: list[list[str]], rows: list[int], title: str) -> go.Figure:
    colorscale = [[0.0, REJECTED], [0.33, REJECTED], [0.33, UNREACHED], [0.67, UNREACHED], [0.67, ACCEPTED],
                  [1.0, ACCEPTED]]
    figure = go.Figure(go.Heatmap(
        z=z, x=list(range(len(z[0]) if z else 0)), y=rows, hovertext=hover, hoverinfo="text",
        colorscale=colorscale, zmin=0, zmax=1, xgap=1, ygap=1,
        colorbar=dict(title="verdict", tickvals=[0, 0.5, 1], ticktext=["rejected", "not reached", "accepted"]),
    ))
    figure.update_yaxes(autorange="reversed", type="category")
    figure.update_xaxes(dtick=1)
    return base_layout(figure, title, "draft position", "round", height=min(900, 200 + 8 * len(rows)))


def accepted_length_histogram(traces: Sequence[Trace]) -> go.Figure:
    """Drafting steps by accepted draft tokens (vLLM's acceptance histogram, bonus excluded): our rounds, and
    imported engine records beside them."""
    lanes = [(i, t, h) for i, t in enumerate(traces) if _speculative(t) and (h := acceptance_histogram(t))]
    if not lanes:
        return empty_figure("No draft-verify lanes yet (or their engines reported no histogram).")
    figure = go.Figure()
    for index, trace, counts in lanes:
        figure.add_trace(go.Bar(x=list(range(len(counts))), y=counts, name=lane_name(trace, index),
                                marker_color=lane_color(index), opacity=0.75,
                                hovertemplate="accepted %{x}: %{y} rounds"))
    figure.update_layout(barmode="group")
    return base_layout(figure, "Accepted draft tokens per round", "accepted tokens", "rounds")


def acceptance_by_position_figure(traces: Sequence[Trace]) -> go.Figure:
    """Per-position acceptance: accepted at i / rounds that drafted i; for an imported record that does not say
    which positions each step drafted, vLLM's marginal rate (accepted at i / drafting steps), dashed and so named."""
    lanes = [(i, t) for i, t in enumerate(traces) if _speculative(t)]
    if not lanes:
        return empty_figure("No draft-verify lanes yet.")
    figure = go.Figure()
    for index, trace in lanes:
        rates, dash, note = trace.acceptance_by_depth(), None, ""
        if not rates and trace.engine_record is not None:
            rates, dash = marginal_rate_by_position(trace), "dash"
            note = f", marginal: {_engine_name(trace)} does not report the positions drafted"
        mat = trace.mean_accepted_tokens
        name = f"{lane_name(trace, index)} (MAT {mat:.2f}{note})" if math.isfinite(mat) else lane_name(trace, index)
        figure.add_trace(go.Scatter(x=list(range(len(rates))), y=rates, mode="lines+markers", name=name,
                                    line=dict(color=lane_color(index), dash=dash),
                                    hovertemplate="position %{x}: %{y:.1%} accepted"))
    figure.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return base_layout(figure, "Per-position acceptance rate (accepted at i / rounds that drafted i)",
                       "draft position", "acceptance rate")


def round_timeline(trace: Trace | None, max_rounds: int = 200, lane: int = 0) -> go.Figure:
    if trace is not None and not _has_rounds(trace) and trace.engine_record is not None:
        return empty_figure(f"{_engine_name(trace)} does not report draft and verify time per round.")
    if not _has_rounds(trace):
        return empty_figure("Run a draft-verify strategy to see draft and verify time per round.")
    rounds = trace.rounds[:max_rounds]
    x = [r.round for r in rounds]
    figure = go.Figure([
        go.Bar(x=x, y=[1000 * r.draft_time_s for r in rounds], name="draft", marker_color="#E69F00",
               hovertemplate="round %{x}: draft %{y:.1f} ms"),
        go.Bar(x=x, y=[1000 * r.verify_time_s for r in rounds], name="verify", marker_color="#0072B2",
               hovertemplate="round %{x}: verify %{y:.1f} ms"),
    ])
    figure.update_layout(barmode="stack")
    top = [1000 * (r.draft_time_s + r.verify_time_s) for r in rounds]
    for key, label, symbol, color in (("fallback", "fallback (draft unsure)", "triangle-down", "#CC79A7"),
                                      ("rolled_back", "rollback", "x", "#D55E00")):
        marked = [(r.round, top[i], float(r.details.get(key, 0))) for i, r in enumerate(rounds)
                  if float(r.details.get(key, 0) or 0) > 0]
        if marked:  # BiLD's policies: where the small model handed over, and where the large one rolled back
            figure.add_trace(go.Scatter(x=[m[0] for m in marked], y=[m[1] * 1.08 for m in marked], mode="markers",
                                        name=label, marker=dict(symbol=symbol, size=9, color=color),
                                        customdata=[m[2] for m in marked],
                                        hovertemplate=f"round %{{x}}: {label} (%{{customdata:.0f}})"))
    return base_layout(figure, f"Draft vs verify time per round — {lane_name(trace, lane)}", "round", "ms")


def layer_skip_figure(traces: Sequence[Trace]) -> go.Figure:
    """Per skipped-layer set: how often its drafts agreed with the full model, and what a draft token cost."""
    lanes = [(i, t) for i, t in enumerate(traces) if _has_rounds(t) and t.has_round_detail("skipped_layers")]
    if not lanes:
        return empty_figure("Add a self_speculative lane to see agreement per skipped-layer set.")
    figure = make_subplots(rows=1, cols=2, subplot_titles=("first-token agreement with the full model",
                                                           "draft cost per token (ms)"))
    for index, trace in lanes:
        stats: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0])
        for round_ in trace.rounds:
            entry = stats[str(round_.details.get("skipped_layers", "?"))]
            entry[0] += 1
            entry[1] += round_.verdicts[0] == "accepted"
            entry[2] += round_.draft_time_s
            entry[3] += len(round_.draft_tokens)
        labels = [f"[{key}]" for key in stats]
        color = lane_color(index)
        figure.add_trace(go.Bar(x=labels, y=[v[1] / v[0] for v in stats.values()], name=lane_name(trace, index),
                                marker_color=color, customdata=[v[0] for v in stats.values()],
                                hovertemplate="skip %{x}: %{y:.1%} over %{customdata} rounds"), row=1, col=1)
        figure.add_trace(go.Bar(x=labels, y=[1000 * v[2] / max(v[3], 1) for v in stats.values()],
                                marker_color=color, showlegend=False,
                                hovertemplate="skip %{x}: %{y:.1f} ms per draft token"), row=1, col=2)
    base_layout(figure, "Layer skip: agreement and cost per skipped set", "", "", height=420)
    figure.update_yaxes(tickformat=".0%", range=[0, 1.02], row=1, col=1)
    figure.update_xaxes(title_text="skipped layers", row=1, col=1)
    figure.update_xaxes(title_text="skipped layers", row=1, col=2)
    return figure


def skip_set_figure(trace: Trace | None, max_rounds: int = 300, lane: int = 0) -> go.Figure:
    """Which layers drafted each round (a searched skip set changes as it goes: CLaSp's DP re-runs after every
    verification), under the tokens that round accepted."""
    rounds = [r for r in (trace.rounds if trace is not None else []) if r.details.get("skipped_layers") is not None]
    if not rounds:
        return empty_figure("Run a self_speculative lane to see its skipped layers round by round.")
    rounds = rounds[:max_rounds]
    sets = [{int(x) for x in str(r.details["skipped_layers"]).split(",") if x.strip()} for r in rounds]
    layers = max(max(s, default=0) for s in sets) + 2
    x = [r.round for r in rounds]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.3, 0.7], vertical_spacing=0.08,
                           subplot_titles=("accepted draft tokens", "skipped layers (dark = skipped)"))
    figure.add_trace(go.Bar(x=x, y=[r.accepted_count for r in rounds], marker_color="#009E73", name="accepted",
                            hovertemplate="round %{x}: %{y} accepted"), row=1, col=1)
    z = [[1.0 if layer in skipped else 0.0 for skipped in sets] for layer in range(layers)]
    figure.add_trace(go.Heatmap(x=x, y=list(range(layers)), z=z, colorscale=[[0, "#F2F2F2"], [1, "#0072B2"]],
                                showscale=False, name="skipped", hovertemplate="round %{x}, layer %{y}: %{z}",
                                xgap=1, ygap=1), row=2, col=1)
    changes = sum(a != b for a, b in zip(sets, sets[1:], strict=False))
    base_layout(figure, f"Skipped layers per round — {lane_name(trace, lane)} ({changes} changes)", "", "",
                height=460)
    figure.update_yaxes(title_text="tokens", row=1, col=1)
    figure.update_yaxes(title_text="layer", row=2, col=1)
    figure.update_xaxes(title_text="round", row=2, col=1)
    return figure


# ----------------------------------------------------------------------------------------------- Jacobi
@dataclass(frozen=True)
class JacobiCell:
    iteration: int
    position: int
    token_text: str
    final: bool  # equals the token finally committed at this position


def jacobi_cells(trace: Trace) -> tuple[list[JacobiCell], dict[int, int]]:
    """The iteration x position grid and, per committed position, the iteration it converged at: the first
    iteration from which its guess stayed equal to the committed token. Row k holds the guesses y^(k) that
    iteration k verified, plus the one new guess y^(k+1) its pass committed as the bonus token."""
    committed = {s.position: s.token_id for s in trace.token_steps}
    commit_iteration: dict[int, int] = {}
    guesses: dict[int, list[tuple[int, int]]] = defaultdict(list)
    cells = []
    for round_ in trace.rounds:
        for i, token in enumerate(round_.draft_tokens):
            position = round_.position + i
            guesses[position].append((round_.round, token))
            cells.append(JacobiCell(round_.round, position, round_.draft_texts[i], committed.get(position) == token))
        for offset in range(round_.accepted_count):  # accepted guesses: committed at this iteration
            commit_iteration.setdefault(round_.position + offset, round_.round)
        # The bonus token is y^(k+1) at the first position not accepted: the new guess that this iteration's
        # pass produced there, committed at once. It is a cell of iteration k + 1 (no later draft row holds
        # that position, because it is committed).
        bonus = round_.position + round_.accepted_count
        guesses[bonus].append((round_.round + 1, round_.bonus_token))
        cells.append(JacobiCell(round_.round + 1, bonus, round_.bonus_text,
                                committed.get(bonus) == round_.bonus_token))
        commit_iteration.setdefault(bonus, round_.round + 1)
    converged: dict[int, int] = {}
    for position in sorted(commit_iteration):
        iteration = commit_iteration[position]
        first = iteration
        for guess_iteration, token in reversed(guesses.get(position, [])):
            if guess_iteration > iteration:
                continue
            if token != committed.get(position):
                break
            first = guess_iteration
        # A guess that matched by chance before its predecessor was fixed had not converged yet.
        converged[position] = max(first, converged.get(position - 1, first))
    return cells, converged


def jacobi_grid(trace: Trace | None, max_positions: int = 80, lane: int = 0) -> go.Figure:
    if not _has_rounds(trace) or not trace.has_round_detail("iteration"):
        return empty_figure("Run a jacobi lane to see its iteration x position grid.")
    cells, converged = jacobi_cells(trace)
    first = min(c.position for c in cells)
    cells = [c for c in cells if c.position < first + max_positions]
    figure = go.Figure(go.Scatter(
        x=[c.position for c in cells], y=[c.iteration for c in cells], mode="markers+text",
        text=[show_token(c.token_text, 5) for c in cells], textfont=dict(size=9),
        marker=dict(symbol="square", size=16, color=[ACCEPTED if c.final else UNREACHED for c in cells]),
        hovertext=[f"iteration {c.iteration}, position {c.position}: {c.token_text!r}"
                   f"{' (final)' if c.final else ''}" for c in cells], hoverinfo="text", name="guess",
    ))
    shown = {p: i for p, i in converged.items() if p < first + max_positions}
    figure.add_trace(go.Scatter(x=list(shown), y=list(shown.values()), mode="markers", name="converged",
                                marker=dict(symbol="diamond-open", size=20, color="#D55E00", line=dict(width=2)),
                                hovertemplate="position %{x} converged at iteration %{y}"))
    figure.update_yaxes(autorange="reversed")
    return base_layout(figure, f"Jacobi: guesses per iteration (blue = the final token) — {lane_name(trace, lane)}",
                       "position", "iteration",
                       height=min(900, 220 + 18 * len({c.iteration for c in cells})))


def jacobi_dependency_graph(trace: Trace) -> nx.DiGraph:
    """Positions as nodes (with their convergence iteration); an edge i-1 -> i says i converged no earlier
    than i-1, marked `parallel` when both converged in the same iteration."""
    _, converged = jacobi_cells(trace)
    graph = nx.DiGraph()
    texts = {s.position: s.token_text for s in trace.token_steps}
    for position in sorted(converged):
        graph.add_node(position, iteration=converged[position], token=texts.get(position, ""))
        if position - 1 in converged:
            graph.add_edge(position - 1, position, parallel=converged[position] == converged[position - 1])
    return graph


def jacobi_graph_figure(trace: Trace | None, max_positions: int = 80, lane: int = 0) -> go.Figure:
    if not _has_rounds(trace) or not trace.has_round_detail("iteration"):
        return empty_figure("Run a jacobi lane to see which positions converged after which.")
    graph = jacobi_dependency_graph(trace)
    nodes = sorted(graph.nodes)[:max_positions]
    keep = set(nodes)
    figure = go.Figure()
    for kind, color, dash in ((True, "#0072B2", "solid"), (False, "#999999", "dot")):
        xs, ys = [], []
        for a, b, data in graph.edges(data=True):
            if a in keep and b in keep and data["parallel"] == kind:
                xs += [a, b, None]
                ys += [graph.nodes[a]["iteration"], graph.nodes[b]["iteration"], None]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, dash=dash),
                                    name="same iteration" if kind else "waited for an earlier position",
                                    hoverinfo="skip"))
    figure.add_trace(go.Scatter(
        x=nodes, y=[graph.nodes[n]["iteration"] for n in nodes], mode="markers+text", name="position",
        text=[show_token(graph.nodes[n]["token"], 5) for n in nodes], textposition="top center",
        marker=dict(size=10, color="#E69F00"), textfont=dict(size=9),
        hovertext=[f"position {n} {graph.nodes[n]['token']!r} converged at iteration {graph.nodes[n]['iteration']}"
                   for n in nodes], hoverinfo="text",
    ))
    return base_layout(figure, f"Jacobi: convergence dependencies — {lane_name(trace, lane)}", "position",
                       "converged at iteration")


# ------------------------------------------------------------------------------------------ draft trees
VERDICT_COLORS = {"accepted": ACCEPTED, "rejected": REJECTED, "unreached": UNREACHED, "bonus": "#E69F00"}


def _tree_positions(parents: list[int]) -> list[tuple[float, float]]:
    """Depth on x; on y, nodes in drafting order within their depth (deterministic)."""
    depths = tree_depths(parents)
    seen: dict[int, int] = defaultdict(int)
    positions = []
    for depth in depths:
        positions.append((float(depth + 1), -float(seen[depth])))
        seen[depth] += 1
    return positions


def draft_tree_figure(trace: Trace | None, max_rounds: int = 60, lane: int = 0) -> go.Figure:
    """One draft tree per round with a slider: nodes coloured by verdict, the bonus token after the accepted
    path, hover with token, q, p and u."""
    rounds = [r for r in (trace.rounds if trace is not None else []) if len(r.draft_tokens) > 0][:max_rounds]
    if not rounds:
        return empty_figure("Run a draft-verify lane (tree_speculative, token_recycling, lookahead, ...) to see "
                            "its draft trees.")
    figure = go.Figure()
    for index, round_ in enumerate(rounds):
        positions = _tree_positions(round_.parents)
        xs, ys = [], []
        for node, parent in enumerate(round_.parents):
            start = (0.0, 0.0) if parent < 0 else positions[parent]
            xs += [start[0], positions[node][0], None]
            ys += [start[1], positions[node][1], None]
        path = [i for i, v in enumerate(round_.verdicts) if v == "accepted"]
        end = positions[path[-1]] if path else (0.0, 0.0)
        bonus = (end[0] + 1, end[1])
        visible = index == 0
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#CCCCCC"), hoverinfo="skip",
                                    showlegend=False, visible=visible))
        figure.add_trace(go.Scatter(
            x=[0.0] + [p[0] for p in positions] + [bonus[0]], y=[0.0] + [p[1] for p in positions] + [bonus[1]],
            mode="markers+text", showlegend=False, visible=visible, textposition="middle right",
            text=["▶"] + [show_token(t, 6) for t in round_.draft_texts] + [show_token(round_.bonus_text, 6)],
            marker=dict(size=12, color=["#000000"] + [VERDICT_COLORS[v] for v in round_.verdicts]
                        + [VERDICT_COLORS["bonus"]], symbol=["circle"] * (len(positions) + 1) + ["star"]),
            hovertext=["committed context"] + [
                f"{t!r} {v}<br>q = {_fmt(q)}, p = {_fmt(p)}, u = {_fmt(u)}"
                for t, v, q, p, u in zip(round_.draft_texts, round_.verdicts, round_.q, round_.p, round_.u,
                                         strict=True)] + [f"{round_.bonus_kind}: {round_.bonus_text!r}"],
            hoverinfo="text",
        ))
    keys = legend_keys(figure, [("accepted", VERDICT_COLORS["accepted"], "circle"),
                                ("rejected", VERDICT_COLORS["rejected"], "circle"),
                                ("not reached", VERDICT_COLORS["unreached"], "circle"),
                                ("bonus / correction token", VERDICT_COLORS["bonus"], "star"),
                                ("committed context", "#000000", "circle")])
    steps = []
    for index, round_ in enumerate(rounds):
        visible = [i // 2 == index for i in range(2 * len(rounds))] + [True] * keys
        steps.append(dict(method="update", label=str(round_.round),
                          args=[{"visible": visible},
                                {"title.text": f"Draft tree, round {round_.round}: {len(round_.draft_tokens)} "
                                               f"nodes, {round_.accepted_count} accepted + {round_.bonus_kind} — "
                                               f"{lane_name(trace, lane)}"}]))
    figure.update_layout(sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="round "), pad=dict(t=40))])
    figure.update_yaxes(showticklabels=False)
    first = rounds[0]
    return base_layout(figure, f"Draft tree, round {first.round}: {len(first.draft_tokens)} nodes, "
                       f"{first.accepted_count} accepted + {first.bonus_kind} — {lane_name(trace, lane)}", "depth",
                       "siblings", height=480)


def tree_size_figure(traces: Sequence[Trace]) -> go.Figure:
    """Per round: how many nodes were drafted and how many were accepted."""
    lanes = [(i, t) for i, t in enumerate(traces) if _has_rounds(t)]
    if not lanes:
        return empty_figure("No draft-verify lanes yet.")
    figure = go.Figure()
    for index, trace in lanes:
        x = [r.round for r in trace.rounds]
        name = lane_name(trace, index)
        figure.add_trace(go.Scatter(x=x, y=[len(r.draft_tokens) for r in trace.rounds], mode="lines",
                                    name=f"{name}: drafted", line=dict(color=lane_color(index), dash="dot"),
                                    hovertemplate="round %{x}: %{y} drafted"))
        figure.add_trace(go.Scatter(x=x, y=[r.accepted_count for r in trace.rounds], mode="lines+markers",
                                    name=f"{name}: accepted", line=dict(color=lane_color(index)),
                                    hovertemplate="round %{x}: %{y} accepted"))
    return base_layout(figure, "Tree size vs accepted length per round", "round", "tokens")


def pool_graph(trace: Trace) -> nx.DiGraph:
    """Tokens as nodes; an edge a -> b for every recorded continuation step (head -> first token, and along
    each continuation); `accepted` marks edges that accepted draft tokens walked."""
    graph = nx.DiGraph()
    for update in (e for e in trace.events if e.kind == "pool_update"):
        for head, head_text, tokens, texts in zip(update.heads, update.head_texts, update.continuations,
                                                  update.continuation_texts, strict=True):
            graph.add_node(head, text=head_text)
            previous = head
            for token, text in zip(tokens, texts, strict=True):
                graph.add_node(token, text=text)
                if graph.has_edge(previous, token):
                    graph[previous][token]["count"] += 1
                else:
                    graph.add_edge(previous, token, count=1, accepted=False)
                previous = token
    committed = {s.position: s.token_id for s in trace.token_steps}
    prompt = trace.started.prompt_ids
    for round_ in trace.rounds:
        before = round_.position - 1  # the last committed token, the root of the round's tree
        previous = committed.get(before, prompt[before] if 0 <= before < len(prompt) else None)
        for node in (i for i, v in enumerate(round_.verdicts) if v == "accepted"):
            token = round_.draft_tokens[node]
            if previous is not None and graph.has_edge(previous, token):
                graph[previous][token]["accepted"] = True
            previous = token
    return graph


def layered_positions(graph: nx.DiGraph) -> dict[int, tuple[float, float]]:
    """A deterministic layered layout: a node's layer is its distance from the sources (nodes without an
    incoming edge; in a cycle, the busiest node not yet placed); nodes in a layer sorted by id."""
    layer: dict[int, int] = {}
    pending = sorted(graph.nodes, key=lambda n: (graph.in_degree(n) > 0, -graph.out_degree(n), n))
    while len(layer) < graph.number_of_nodes():
        root = next(n for n in pending if n not in layer)
        layer[root] = 0 if graph.in_degree(root) == 0 or not layer else max(layer.values()) + 1
        frontier = [root]
        while frontier:
            following = []
            for node in frontier:
                for child in sorted(graph.successors(node)):
                    if child not in layer:
                        layer[child] = layer[node] + 1
                        following.append(child)
            frontier = following
    rows: dict[int, list[int]] = defaultdict(list)
    for node in sorted(layer):
        rows[layer[node]].append(node)
    return {node: (float(depth), -float(row)) for depth, nodes in rows.items() for row, node in enumerate(nodes)}


def pool_figure(trace: Trace | None, max_edges: int = 60, lane: int = 0) -> go.Figure:
    """The pool (lookahead's n-grams, Token Recycling's adjacency table) as a layered graph of token texts:
    the edges that produced accepted drafts, then the most used others, at most `max_edges` in all."""
    if trace is None or not any(e.kind == "pool_update" for e in trace.events):
        return empty_figure("Run a lookahead or token_recycling lane to see its n-gram pool / adjacency graph.")
    full = pool_graph(trace)
    ranked = sorted(full.edges(data=True), key=lambda e: (not e[2]["accepted"], -e[2]["count"], e[0], e[1]))
    graph = nx.DiGraph()
    for a, b, data in ranked[:max_edges]:
        graph.add_node(a, **full.nodes[a])
        graph.add_node(b, **full.nodes[b])
        graph.add_edge(a, b, **data)
    positions = layered_positions(graph)
    figure = go.Figure()
    styles = ((False, "#DDDDDD", "recorded continuation"), (True, "#0072B2", "produced an accepted draft"))
    for accepted, color, name in styles:
        xs, ys = [], []
        for a, b, data in graph.edges(data=True):
            if data["accepted"] == accepted:
                xs += [positions[a][0], positions[b][0], None]
                ys += [positions[a][1], positions[b][1], None]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, hoverinfo="skip",
                                    line=dict(color=color, width=2.5 if accepted else 0.8)))
    ordered = sorted(graph.nodes)
    figure.add_trace(go.Scatter(
        x=[positions[n][0] for n in ordered], y=[positions[n][1] for n in ordered], mode="markers+text",
        text=[show_token(graph.nodes[n].get("text", ""), 8) for n in ordered], textfont=dict(size=10),
        textposition="middle right", marker=dict(size=8, color="#E69F00"), name="token",
        hovertext=[f"{graph.nodes[n].get('text', '')!r}: {full.out_degree(n)} continuations recorded"
                   for n in ordered], hoverinfo="text",
    ))
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    rows = max((-y for _, y in positions.values()), default=1)
    return base_layout(figure, f"Pool / adjacency graph: {graph.number_of_edges()} of {full.number_of_edges()} "
                       f"edges (accepted first, then the most used) — {lane_name(trace, lane)}", "", "",
                       height=int(min(900, 260 + 26 * rows)))
