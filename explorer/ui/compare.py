"""The Compare tab: lanes side by side, their views, the cross-lane summary, and what if (branch a lane's run).

Every handler takes and returns `{component: value}` dicts, so nothing depends on the order of a flat list of
components; a `Lane` owns its column and draws the chosen strategy's controls (generated from the registry) when
the strategy changes: the values set in them live in one state per lane, so the page holds a lane's controls for
one strategy, not for all of them (a page of every strategy's controls made each streamed update cost seconds).
The `Page` names every component the handlers read or write; each event's input and output lists derive from it.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from explorer.branch import branch_request
from explorer.fidelity import entry_markdown
from explorer.models import MODEL_CACHE as MODELS
from explorer.presets import all_pairs, find_pair
from explorer.request import RunRequest, check_max_new_tokens
from explorer.sampling import SamplingFilters
from explorer.serving import DIFFUSION_DEMO_HUB_ID, Viewer
from explorer.strategies import REGISTRY
from explorer.strategies.base import FAMILIES, field_type
from explorer.trace import Trace
from explorer.ui.context import (
    CONCURRENCY,
    DEFAULT_MODEL,
    MAX_LANES,
    MAX_NEW_TOKENS_CAP,
    POLICY,
    fail,
    load_runs,
    store,
    strategy_names,
    viewer_of,
)
from viz import metrics_html, tokens_html
from viz.catalog import BEAM_STRATEGIES, VIEW_NAMES, VIEWS, render_all
from viz.summary import greedy_baseline, summary_html, summary_latex, summary_markdown, summary_rows
from viz.theme import has_data
from viz.tokens import color_legend_html
from viz.whatif import branch_tree_figure

NO_PAIR = "(none)"
PAIRS = tuple(p for p in all_pairs() if POLICY.may_offer(p.target) and POLICY.may_offer(p.draft))
DEFAULT_LANES = ["greedy", "sample", "mirostat", "top_h"]
STREAM_EVERY_S = 0.25
STOP_WAIT_S = 60.0  # how long Stop waits for a lane's current step to end (steps are bounded by the limits)
BEAM_TREE_EVERY_S = 0.6
BEAM_VIEW = VIEW_NAMES.index("beam-tree")  # the beam tree also updates while a search runs
BRANCH_VIEW = VIEW_NAMES.index("branch-tree")  # drawn with the lanes' whole stored branch families
FAMILY_LIMIT = 24  # runs at most in one branch tree
# app.py's decoding entry: (model id, requests, owner) -> the lanes' results, round by round (ZeroGPU-aware)
Decode = Callable[[str, list[RunRequest], str], Iterator[list[Any]]]
_ACTIVE: dict[str, tuple[Any, threading.Event]] = {}  # visitor -> (its lanes, the stop flag) while they run
_ACTIVE_LOCK = threading.Lock()
SAME_STRATEGY = "(the lane's own)"
TOKEN_CLICK_JS = ("element.addEventListener('click', (e) => { const t = e.target.closest('.tok'); "
                  "if (t && !e.target.closest('.pop')) trigger('click', {step: Number(t.dataset.step)}); });")


def alternatives(trace: Any, step: int) -> Any:
    """The recorded alternatives at a step of a run (its chosen token left out), as the branch token choices."""
    steps = trace.token_steps if trace is not None else []
    if not 0 <= step < len(steps):
        return gr.Dropdown(choices=[], value=None)
    recorded = steps[step]
    choices = [(f"{text!r}  p={math.exp(logp):.3f}", str(token_id))
               for token_id, text, logp in zip(recorded.top_ids, recorded.top_texts, recorded.top_logprobs,
                                                strict=False) if token_id != recorded.token_id]
    return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)


# ------------------------------------------------------------------------------------- pure rendering
def render_views(traces: list[Any], view_lane: str, viewer: Viewer | None = None) -> list[Any]:
    """Every view of the catalog, in order, for these lanes (per-lane views show lane `view_lane`). With a
    `viewer`, the branch tree also draws the stored branches of the lanes' runs that it may see."""
    figures = render_all(traces, int(view_lane) - 1)
    if viewer is not None:
        family = branch_family(traces, viewer)
        if family:
            figures[BRANCH_VIEW] = branch_tree_figure(traces, family)
    return figures


def branch_family(traces: list[Any], viewer: Viewer) -> list[Trace]:
    """The stored runs of the lanes' branch families that are not open in a lane (those `viewer` may see)."""
    shown = [t.run_id for t in traces if t is not None]
    if not shown:
        return []
    ids = store().family(shown, viewer=viewer, limit=FAMILY_LIMIT)
    return store().load_traces([i for i in ids if i not in shown])


def permalink(traces: list[Any]) -> str:
    ids = ",".join(t.run_id for t in traces if t is not None)
    return f"Permalink: [?compare={ids}](?compare={ids})" if ids else ""


def export_views(traces: list[Any], view_lane: str, width: str, request: gr.Request = None) -> str:
    """Every view of the shown lanes in the paper theme, as SVG, PDF and PNG, in one zip."""
    from viz.paper import FORMATS, save_figure

    if not traces:
        raise fail("run or open some lanes first")
    folder = Path(tempfile.mkdtemp(prefix="explorer-figures-"))
    try:
        for view, figure in zip(VIEWS, render_views(traces, view_lane, viewer_of(request)), strict=True):
            if not has_data(figure):  # no placeholders in a paper's figure folder
                continue
            for fmt in FORMATS:
                save_figure(figure, folder / f"{view.name}.{fmt}", width=width)
    except ValueError as error:
        raise fail(error) from None
    return shutil.make_archive(str(folder.parent / f"{folder.name}-views"), "zip", folder)


# -------------------------------------------------------------------------------------------- lanes
def make_control(config: type, spec: dataclasses.Field, value: Any, interactive: bool = True
                 ) -> gr.components.Component:
    """The control of one config field, showing `value`."""
    kind, meta = field_type(config, spec.name), spec.metadata
    common = dict(label=spec.name, info=meta.get("help"), interactive=interactive)
    if kind is bool:
        return gr.Checkbox(value=value, **common)
    if "choices" in meta:
        return gr.Dropdown(choices=list(meta["choices"]), value=value, **common)
    if kind is str:
        return gr.Textbox(value=value, **common)
    if kind in (int, float) and "minimum" in meta and "maximum" in meta:
        return gr.Slider(meta["minimum"], meta["maximum"], value=value, step=meta.get("step"), **common)
    return gr.Number(value=value, precision=0 if kind is int else None, **common)


SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingFilters)}


def strategy_choices() -> list[tuple[str, str]]:
    """The strategy dropdown's (label, name) pairs, by family (a plugin's under "plugins"), greedy (the baseline)
    first."""
    names = sorted(strategy_names(), key=lambda n: (FAMILIES.index(REGISTRY[n].group), n != "greedy", n))
    return [(f"{name} · {REGISTRY[name].group}", name) for name in names]


def escape_markdown(text: str) -> str:
    """Stored text as literal Markdown: HTML escaped, every Markdown mark backslashed, one line, bounded."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", html.escape(" ".join(str(text).split())[:120]))


def foreign_about(strategy: str, tags: dict[str, str] | None) -> str:
    """What a lane says of a stored run whose strategy this server does not have: an engine's imported record,
    a recorded `generate` call, a plugin not loaded here (the strategy dropdown stays as it was)."""
    tags = tags or {}
    if "external" in tags:
        return (f"**Imported from {escape_markdown(tags['external'])}** ({escape_markdown(tags.get('method', ''))}, "
                f"from {escape_markdown(tags.get('source', 'a file'))}): what the engine reported — text, token "
                "counts, per-step acceptance where given. Not rerun here.")
    return f"**A stored run of `{escape_markdown(strategy)}`**, which this server does not have: shown as stored."


def strategy_about(name: str) -> str:
    """The lane's description line: what the strategy does, its paper, and its fidelity status, which opens the
    strategy's ledger entry in place (the whole ledger: README, `python -m explorer strategies --fidelity`)."""
    spec = REGISTRY[name]
    about = f"{spec.summary}. *{spec.paper}*" if spec.paper else spec.summary
    if spec.family == "diffusion" and DIFFUSION_DEMO_HUB_ID in POLICY.allowed_models:
        about += f" · on a diffusion LM: set the model to `{DIFFUSION_DEMO_HUB_ID}`"
    if spec.plugin:  # the server's own addition: the ledger covers the built-ins only
        return f"{about}\n\n*added by a plugin of this server; not in the fidelity ledger*"
    status = f"{len(spec.departures)} departures" if spec.departures else "faithful"
    # the fidelity entry opens in place (the whole ledger: README, `python -m explorer strategies --fidelity`)
    return (f"{about}\n\n<details class='fidelity-entry'><summary>fidelity: {status} (its ledger entry)</summary>"
            f"\n\n{entry_markdown(name, heading=False)}\n</details>")


def filters_for_rule(count: int) -> Any:
    """A handler enabling `count` filter controls under the sampling rule and disabling them under greedy."""
    return lambda rule: [gr.update(interactive=rule == "sampling")] * count


def strategy_controls(config: type, values: dict[str, Any] | None = None) -> dict[str, gr.components.Component]:
    """A strategy's controls showing `values` (the rest at their defaults), its own parameters first. A
    draft-verify method's sampling filters sit in a collapsed 'sampling rule' group, disabled while its rule is
    greedy (they only shape p and q there)."""
    values = values or {}
    fields = dataclasses.fields(config)
    rule = next((f for f in fields if f.name == "rule"), None)
    own = [f for f in fields if rule is None or f.name not in SAMPLING_FIELDS]
    controls = {spec.name: make_control(config, spec, values.get(spec.name, spec.default)) for spec in own}
    if rule is not None:
        sampling = values.get("rule", rule.default) == "sampling"
        with gr.Accordion("sampling rule: filters applied to p and q (rule = sampling)", open=False):
            for spec in fields:
                if spec.name in SAMPLING_FIELDS:
                    controls[spec.name] = make_control(config, spec, values.get(spec.name, spec.default),
                                                       interactive=sampling)
    return controls


def remember(strategy: str, field: str) -> Any:
    """A handler keeping a control's new value in its lane's state: {strategy: {field: value}}."""
    def set_value(chosen: dict[str, dict[str, Any]] | None, value: Any) -> dict[str, dict[str, Any]]:
        chosen = dict(chosen or {})
        chosen[strategy] = {**chosen.get(strategy, {}), field: value}
        return chosen
    return set_value


def draw_controls(strategy: str, chosen: dict[str, dict[str, Any]] | None, state: gr.State) -> None:
    """Inside a lane's render: the controls of `strategy` with the values chosen before, each remembering its
    changes in `state`, and the sampling filters of a draft-verify method enabled only under its sampling rule."""
    if strategy not in REGISTRY:
        return
    controls = strategy_controls(REGISTRY[strategy].config, (chosen or {}).get(strategy))
    for field_name, control in controls.items():
        control.change(remember(strategy, field_name), [state, control], state, queue=False,
                       show_progress="hidden", api_visibility="private")
    if "rule" in controls:
        filters = [c for name, c in controls.items() if name in SAMPLING_FIELDS]
        controls["rule"].change(filters_for_rule(len(filters)), controls["rule"], filters, queue=False,
                                show_progress="hidden", api_visibility="private")


def draft_model_strategies() -> list[str]:
    """The strategies with a `draft_model` field (a target + draft preset sets it)."""
    return [name for name in strategy_names()
            if any(f.name == "draft_model" for f in dataclasses.fields(REGISTRY[name].config))]


@dataclass
class Lane:
    """One lane's column: its strategy dropdown, the chosen strategy's controls (drawn from its config when the
    strategy changes; the values set in them kept in `chosen`, {strategy: {parameter: value}}, so switching back
    finds them again), its token output and its metrics. `redraw` changes when a handler sets `chosen` (a stored
    run opened, a target + draft preset) so that the controls show it."""

    index: int
    column: gr.Column
    strategy: gr.Dropdown
    about: gr.Markdown
    chosen: gr.State
    redraw: gr.State
    output: gr.HTML
    metrics: gr.HTML

    @classmethod
    def build(cls, index: int, visible: bool, load: Any) -> Lane:
        first = DEFAULT_LANES[index]
        with gr.Column(visible=visible, min_width=260, elem_id=f"lane{index + 1}") as column:
            gr.Markdown(f"**Lane {index + 1}**")
            strategy = gr.Dropdown(strategy_choices(), value=first, label="strategy",
                                   elem_id=f"lane{index + 1}-strategy")
            about = gr.Markdown(strategy_about(first), elem_id=f"lane{index + 1}-about")
            chosen, redraw = gr.State({}), gr.State(0)
            with gr.Accordion("parameters", open=False):
                @gr.render(inputs=[strategy, chosen], triggers=[load, strategy.change, redraw.change], queue=False)
                def controls(name: str, values: dict[str, dict[str, Any]] | None) -> None:
                    draw_controls(name, values, chosen)
            output = gr.HTML(tokens_html(None), elem_id=f"lane{index + 1}-output", js_on_load=TOKEN_CLICK_JS)
            metrics = gr.HTML("", elem_id=f"lane{index + 1}-metrics")
        strategy.change(strategy_about, strategy, about, queue=False, api_visibility="private")
        return cls(index, column, strategy, about, chosen, redraw, output, metrics)

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.strategy, self.chosen]

    def params(self, values: dict[Any, Any]) -> tuple[str, dict[str, Any]]:
        """The chosen strategy and the parameters set for it (the rest take their defaults), from the submitted
        values by component."""
        strategy = values[self.strategy]
        return strategy, dict((values[self.chosen] or {}).get(strategy, {}))

    def restored(self, strategy: str, config: dict[str, Any], tags: dict[str, str] | None = None) -> dict[Any, Any]:
        """The lane set to `strategy` with the parameters of a stored run's `config`, its controls redrawn. A run
        of a strategy this server does not have (a recorded `generate` call, a plugin not loaded here) is shown
        as stored, and the lane's controls stay as they are."""
        if strategy not in REGISTRY:
            return {self.about: foreign_about(strategy, tags)}
        fields = {f.name for f in dataclasses.fields(REGISTRY[strategy].config)}
        return {self.strategy: gr.update(value=strategy),
                self.chosen: {strategy: {k: v for k, v in config.items() if k in fields}},
                self.redraw: time.monotonic_ns()}

    def render(self, trace: Trace | None, color_by: str, baseline: Trace | None,
               live: tuple[float, int] | None = None) -> dict[Any, Any]:
        """While the lane streams (`live`), tokens come without popovers: they are built once it ends."""
        return {self.output: tokens_html(trace, color_by, popovers=live is None),
                self.metrics: metrics_html(trace, baseline, live)}


# --------------------------------------------------------------------------------------------- page
@dataclass(kw_only=True)
class Page:
    """Every component the handlers read or write, by name (built by keyword); the events' input and output
    lists are derived from it (below), never kept by hand. `decode` is app.py's decoding entry."""

    decode: Decode

    prompt: gr.Textbox
    chat: gr.Checkbox
    system: gr.Textbox
    model_id: gr.Textbox
    seed: gr.Number
    seeds: gr.Number
    max_new: gr.Slider
    color_by: gr.Radio
    view_lane: gr.Radio
    lane_count: gr.State
    traces: gr.State
    repeats: gr.State  # {lane index: [run ids]} of the extra seeds of the last Run (seeds per lane > 1)
    link: gr.Markdown
    tabs: gr.Tabs
    add_btn: gr.Button
    remove_btn: gr.Button
    baseline_btn: gr.Button
    run_btn: gr.Button
    stop_btn: gr.Button
    summary: gr.HTML
    summary_markdown: gr.Code
    summary_latex: gr.Code
    lanes: list[Lane] = field(default_factory=list)
    views: list[gr.Plot] = field(default_factory=list)
    probes: dict[str, Any] = field(default_factory=dict)  # lens, attention, attention_layers: record switches
    branching: dict[str, Any] = field(default_factory=dict)  # lane, step, token, strategy, button: what if

    # ------------------------------------------------------------------------------- derived lists
    @property
    def lane_outputs(self) -> list[Any]:
        return [c for lane in self.lanes for c in (lane.output, lane.metrics)]

    @property
    def lane_controls(self) -> list[Any]:
        """What `show_lanes` sets: how many lanes, their columns, the lane buttons and the per-lane view picker."""
        return [self.lane_count, *(lane.column for lane in self.lanes), self.add_btn, self.remove_btn,
                self.baseline_btn, self.view_lane]

    @property
    def run_inputs(self) -> set[Any]:
        return {self.prompt, self.chat, self.system, self.model_id, self.seed, self.seeds, self.max_new, self.color_by,
                self.view_lane, self.lane_count, *self.probes.values(),
                *(c for lane in self.lanes for c in lane.inputs)}

    @property
    def run_outputs(self) -> list[Any]:
        """What a run (and Stop) sets: the lanes, the views, the summary, the permalink, the buttons."""
        return [*self.lane_outputs, *self.views, self.traces, self.link, self.run_btn, self.stop_btn, self.summary,
                self.summary_markdown, self.summary_latex, self.repeats]

    @property
    def branch_outputs(self) -> list[Any]:
        """A branch also opens a lane and says what runs there."""
        return [*self.run_outputs, *(lane.strategy for lane in self.lanes), *self.lane_controls]

    # ------------------------------------------------------------------------------------ rendering
    def render_lanes(self, traces: list[Any], color_by: str, lives: list[tuple[float, int]] | None = None
                     ) -> dict[Any, Any]:
        baseline = greedy_baseline(traces)
        out: dict[Any, Any] = {}
        for lane in self.lanes:
            shown = lane.index < len(traces)
            live = lives[lane.index] if lives is not None and shown else None
            out |= lane.render(traces[lane.index] if shown else None, color_by, baseline, live)
        return out

    def render_summary(self, traces: list[Any], groups: dict[int, list[Any]] | None = None) -> dict[Any, Any]:
        """The cross-lane table (with `groups`, each lane's runs over seeds: mean ± interval), and the same as
        Markdown and LaTeX to copy."""
        rows = summary_rows(traces, groups)
        return {self.summary: summary_html(rows), self.summary_markdown: summary_markdown(rows) if rows else "",
                self.summary_latex: summary_latex(rows) if rows else ""}

    def finished(self, traces: list[Any], color_by: str, view_lane: str, viewer: Viewer) -> dict[Any, Any]:
        """Everything shown once lanes have ended (finished, failed or stopped)."""
        return {**self.render_lanes(traces, color_by), **self.views_of(traces, view_lane, viewer),
                **self.render_summary(traces), self.traces: traces, self.link: permalink(traces),
                self.run_btn: gr.Button(interactive=True), self.stop_btn: gr.Button(interactive=False)}

    def views_of(self, traces: list[Any], view_lane: str, viewer: Viewer) -> dict[Any, Any]:
        return dict(zip(self.views, render_views(traces, view_lane, viewer), strict=True))

    def render_views(self, traces: list[Any], view_lane: str, request: gr.Request = None) -> dict[Any, Any]:
        return self.views_of(traces, view_lane, viewer_of(request))

    def show_lanes(self, count: int, view_lane: str = "1") -> dict[Any, Any]:
        """`count` lanes visible; the per-lane view picker offers those lanes only; the lane buttons are enabled
        only where they can act (never a broken page)."""
        view = view_lane if view_lane and int(view_lane) <= count else str(count)
        return {self.lane_count: count, **{lane.column: gr.Column(visible=lane.index < count) for lane in self.lanes},
                self.view_lane: gr.Radio(choices=[str(i + 1) for i in range(count)], value=view),
                self.add_btn: gr.Button(interactive=count < MAX_LANES),
                self.baseline_btn: gr.Button(interactive=count < MAX_LANES),
                self.remove_btn: gr.Button(interactive=count > 1)}

    def opened(self, traces: list[Trace], color_by: str, view_lane: str, viewer: Viewer) -> dict[Any, Any]:
        """Stored runs shown in the lanes, as if they had just run, with the inputs that made them restored (so
        that Run reproduces what is shown)."""
        started = traces[0].started
        inputs = {self.prompt: started.prompt, self.chat: started.chat, self.system: started.system_prompt or "",
                  self.seed: started.seed, self.max_new: min(started.max_new_tokens, MAX_NEW_TOKENS_CAP),
                  self.model_id: "embedded" if started.model_id.startswith("embedded") else started.model_id}
        for lane, trace in zip(self.lanes, traces, strict=False):
            inputs |= lane.restored(trace.started.strategy, trace.started.config, trace.started.tags)
        return {**self.render_lanes(traces, color_by), **self.views_of(traces, view_lane, viewer), self.traces: traces,
                **self.render_summary(traces), self.link: permalink(traces), **self.show_lanes(len(traces), view_lane),
                **inputs, self.tabs: gr.Tabs(selected="compare")}

    # ------------------------------------------------------------------------------------- handlers
    def run(self, values: dict[Any, Any], request: gr.Request) -> Iterator[dict[Any, Any]]:
        """Decode every open lane, streaming tokens (and the beam tree) while they run."""
        color_by, view_lane = values[self.color_by], values[self.view_lane]
        try:
            max_new_tokens = check_max_new_tokens(values[self.max_new], MAX_NEW_TOKENS_CAP)
            shared = dict(prompt=values[self.prompt], chat=values[self.chat], system_prompt=values[self.system],
                          max_new_tokens=max_new_tokens, seed=values[self.seed], **self.probe_options(values))
            requests = []
            POLICY.check_lanes(int(values[self.lane_count]))
            for lane in self.lanes[:int(values[self.lane_count])]:
                strategy, params = lane.params(values)
                requests.append(POLICY.limit(RunRequest.build(strategy, params, **shared)))
            model_id = POLICY.check_model(values[self.model_id] or DEFAULT_MODEL)
            seeds = POLICY.check_seeds(values[self.seeds])
            viewer = viewer_of(request)
            with POLICY.visitor_run(viewer.owner):  # one slot of this visitor's, held until the lanes end or Stop
                done: dict[Any, Any] = {}
                for update in self.stream(self.decode(model_id, requests, viewer.owner), viewer, color_by, view_lane,
                                          any(r.strategy in BEAM_STRATEGIES for r in requests)):
                    if self.link in update:  # the lanes ended (not stopped)
                        done = update
                        if seeds > 1:  # the other seeds run next: the buttons stay as they are
                            update = {k: v for k, v in update.items() if k not in (self.run_btn, self.stop_btn)}
                    yield update
                if seeds > 1 and done:
                    yield from self.run_seeds(model_id, requests, done[self.traces], seeds, viewer)
        except ValueError as error:  # one message; the lanes keep what they showed
            gr.Warning(str(error))
            yield {self.run_btn: gr.Button(interactive=True), self.stop_btn: gr.Button(interactive=False)}

    def run_seeds(self, model_id: str, requests: list[RunRequest], first: list[Any], seeds: int,
                  viewer: Viewer) -> Iterator[dict[Any, Any]]:
        """Each lane's config again with seeds s + 1 ... s + seeds - 1 (stored, tagged with the lane's first run),
        then the summary as mean ± 95 % interval over the seeds. The lanes and views keep the first seed's run."""
        extra = [dataclasses.replace(r, seed=r.seed + k, tags={**r.tags, "seed_of": t.run_id, "seeds": str(seeds)})
                 for k in range(1, seeds) for r, t in zip(requests, first, strict=True)]
        lanes = self.decode(model_id, extra, viewer.owner)
        stop = threading.Event()
        with _ACTIVE_LOCK:
            _ACTIVE[viewer.owner] = (lanes, stop)
        results, last = [], 0.0
        for results in lanes:
            if stop.is_set():
                lanes.close()
                return
            if time.perf_counter() - last >= STREAM_EVERY_S:
                last = time.perf_counter()
                done = sum(r.trace is not None and r.trace.finished is not None for r in results)
                yield {self.summary: summary_html(summary_rows(first)) + (
                    f'<div class="run-status">seeds: {done} of {len(extra)} more runs done</div>')}
        with _ACTIVE_LOCK:
            _ACTIVE.pop(viewer.owner, None)
        groups = {i: [t] for i, t in enumerate(first)}
        for result in results:
            trace = result.trace
            lane = next((i for i, t in enumerate(first) if t.run_id == trace.started.tags.get("seed_of")), None)
            if lane is not None:
                groups[lane].append(trace)
        yield {**self.render_summary(first, groups), self.repeats: {i: [t.run_id for t in g[1:]]
                                                                    for i, g in groups.items()},
               self.run_btn: gr.Button(interactive=True), self.stop_btn: gr.Button(interactive=False)}

    def probe_options(self, values: dict[Any, Any]) -> dict[str, Any]:
        return {"lens": bool(values[self.probes["lens"]]), "attention": bool(values[self.probes["attention"]]),
                "attention_layers": str(values[self.probes["attention_layers"]] or "")}

    def stream(self, lanes: Iterator[list[Any]], viewer: Viewer, color_by: str, view_lane: str, searching: bool,
               before: list[Any] = (), opening: dict[Any, Any] | None = None) -> Iterator[dict[Any, Any]]:
        """Stream running lanes into the page (after the lanes `before` them, which stay as they are); `opening`
        goes with the first update."""
        before = list(before)
        last = last_tree = 0.0
        results = []
        stop = threading.Event()
        with _ACTIVE_LOCK:
            _ACTIVE[viewer.owner] = (lanes, stop)  # so that Stop can end these runs at once
        yield {**(opening or {}), self.run_btn: gr.Button(interactive=False),
               self.stop_btn: gr.Button(interactive=True)}
        for results in lanes:
            if stop.is_set():  # Stop was pressed: end the lanes here, in the thread that runs them
                lanes.close()
                return
            if time.perf_counter() - last >= STREAM_EVERY_S:
                last = time.perf_counter()
                traces = before + [r.trace for r in results]
                update = self.render_lanes(traces, color_by, [(0.0, 0)] * len(before) + [r.live for r in results])
                update[self.traces] = traces  # what Stop shows if it comes now
                if searching and last - last_tree >= BEAM_TREE_EVERY_S:  # the beam tree grows live
                    last_tree = last
                    update[self.views[BEAM_VIEW]] = VIEWS[BEAM_VIEW].render(traces, int(view_lane) - 1)
                yield update
        with _ACTIVE_LOCK:
            _ACTIVE.pop(viewer.owner, None)
        for result in results:
            if result.error:
                gr.Warning(f"a lane failed: {result.error} (stored as failed)")
        traces = before + [r.trace for r in results]
        done = self.finished(traces, color_by, view_lane, viewer)
        yield {**done, **self.show_lanes(len(traces), view_lane)} if before else done

    def branch(self, values: dict[Any, Any], request: gr.Request) -> Iterator[dict[Any, Any]]:
        """What if: continue a lane's run from a step with another token, as a new lane beside it."""
        color_by, view_lane = values[self.color_by], values[self.view_lane]
        what = self.branching
        traces = [t for t in values[self.traces] or [] if t is not None]
        try:
            lane = int(values[what["lane"]] or 0) - 1
            if not 0 <= lane < len(traces):
                raise ValueError("run the lanes first, then click a token in one of them to branch from it")
            if len(traces) >= MAX_LANES:
                raise ValueError(f"all {MAX_LANES} lanes are in use: remove one to open the branch beside them")
            parents, viewer = load_runs(traces[lane].run_id, request)
            parent = parents[0]
            model_id = POLICY.check_model(values[self.model_id] or DEFAULT_MODEL)
            strategy = values[what["strategy"]]
            run = POLICY.limit(branch_request(
                MODELS.get(model_id), parent, int(values[what["step"]] or 0), values[what["token"]] or "",
                None if strategy in (None, SAME_STRATEGY) else strategy, {}, **self.probe_options(values)))
            with POLICY.visitor_run(viewer.owner):
                yield from self.stream(self.decode(model_id, [run], viewer.owner), viewer, color_by, view_lane,
                                       run.strategy in BEAM_STRATEGIES, before=traces,
                                       # the new lane says what runs there, from the start: set at the end, its
                                       # controls' change lost the views of tabs not yet opened (Gradio 6)
                                       opening={self.lanes[len(traces)].strategy: gr.update(value=run.strategy)})
        except gr.Error as error:
            gr.Warning(error.message)
        except ValueError as error:
            gr.Warning(str(error))
            yield {self.run_btn: gr.Button(interactive=True), self.stop_btn: gr.Button(interactive=False)}

    def pick_token(self, index: int) -> Any:
        """A click on a token of lane `index`: the branch panel points at it and offers its alternatives."""
        def picked(traces: list[Any], event: gr.EventData) -> dict[Any, Any]:
            step = getattr(event, "step", None)
            if step is None or index >= len(traces or []) or traces[index] is None:
                return {self.branching["lane"]: gr.skip()}
            return {self.branching["lane"]: index + 1, self.branching["step"]: int(step),
                    self.branching["token"]: alternatives(traces[index], int(step))}
        return picked

    def choose_step(self, traces: list[Any], lane: Any, step: Any) -> Any:
        try:
            return alternatives(traces[int(lane) - 1], int(step))
        except (TypeError, ValueError, IndexError):
            return gr.Dropdown(choices=[], value=None)

    def stop(self, traces: list[Any], color_by: str, view_lane: str, request: gr.Request) -> dict[Any, Any]:
        """End this session's runs now (stored as cancelled with every step they made) and show them as they
        stand: the lanes, views, summary and permalink of the partial runs."""
        viewer = viewer_of(request)
        with _ACTIVE_LOCK:
            active = _ACTIVE.pop(viewer.owner, None)
        deadline = time.perf_counter() + STOP_WAIT_S
        if active is not None:
            lanes, stop = active
            stop.set()  # a run handler still iterating ends the lanes after its current step
            while time.perf_counter() < deadline:  # one that Gradio has let go of is closed from here
                try:
                    lanes.close()  # a no-op once the handler has closed them
                    break
                except ValueError:  # inside a step right now
                    time.sleep(0.05)
        ids = [t.run_id for t in traces or [] if t is not None]
        if not ids:
            return {self.run_btn: gr.Button(interactive=True), self.stop_btn: gr.Button(interactive=False)}
        traces = store().load_traces(ids)  # as stored: the lanes show exactly what the database holds
        steps = max(len(t.token_steps) for t in traces)
        gr.Info(f"stopped at step {steps}: the runs are stored as cancelled with the steps they made")
        return self.finished(traces, color_by, view_lane, viewer)

    def change_lanes(self, count: int, delta: int, view_lane: str) -> dict[Any, Any]:
        return self.show_lanes(min(max(int(count) + delta, 1), MAX_LANES), view_lane)

    def add_greedy_baseline(self, count: int, view_lane: str) -> dict[Any, Any]:
        """Open one more lane set to greedy: the baseline that speedups are measured against."""
        if int(count) >= MAX_LANES:
            gr.Warning(f"all {MAX_LANES} lanes are in use: remove one first")
            return self.show_lanes(int(count), view_lane)
        added = self.lanes[int(count)]
        return {**self.show_lanes(int(count) + 1, view_lane), added.strategy: gr.update(value="greedy")}

    def open_runs(self, run_ids: str, color_by: str, view_lane: str, request: gr.Request) -> dict[Any, Any]:
        traces, viewer = load_runs(run_ids, request)
        return self.opened(traces, color_by, view_lane, viewer)

    def on_load(self, color_by: str, view_lane: str, request: gr.Request) -> dict[Any, Any]:
        """Permalinks: ?run=ID or ?compare=ID,ID,... open stored runs."""
        params = dict(request.query_params) if request is not None else {}
        ids = params.get("compare") or params.get("run")
        nothing = {self.link: gr.skip()}  # an empty dict would read as one value, not as "no updates"
        if not ids:
            return nothing
        try:
            traces, viewer = load_runs(ids, request)
            return self.opened(traces, color_by, view_lane, viewer)
        except gr.Error as error:
            gr.Warning(f"permalink: {error.message}")
            return nothing

    @property
    def opened_outputs(self) -> list[Any]:
        """Stored runs opened: what a run sets but the buttons, the lanes' controls, the tabs and the inputs."""
        return [*[c for c in self.run_outputs if c not in (self.run_btn, self.stop_btn)],
                *(c for lane in self.lanes for c in (lane.strategy, lane.about)), *self.lane_controls, self.tabs,
                self.prompt, self.chat, self.system, self.seed, self.max_new, self.model_id,
                *(c for lane in self.lanes for c in (lane.chosen, lane.redraw))]


# ------------------------------------------------------------------------------------------- layout
def compare_tab(tabs: gr.Tabs, blocks: gr.Blocks, decode: Decode) -> Page:
    """The tab's layout and events; `decode` runs the lanes (app.py's entry, in a ZeroGPU worker on a Space)."""
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=3, scale=4, elem_id="prompt",
                            value="Write a short poem about the sea.")
        with gr.Column(scale=1):
            run_btn = gr.Button("Run", variant="primary", elem_id="run")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False)
    gr.Markdown(POLICY.describe(), elem_id="limits")
    with gr.Row():  # minimum widths: on a narrow page (a Space in an iframe) the row wraps, nothing is clipped
        chat = gr.Checkbox(value=True, label="chat template", min_width=150)
        system = gr.Textbox(label="System prompt (optional)", scale=2, min_width=200)
        model_id = gr.Textbox(value=DEFAULT_MODEL, label="Model (embedded, HF id or local path)", scale=2,
                              min_width=200)
        pair = gr.Dropdown([NO_PAIR, *(p.name for p in PAIRS)], value=NO_PAIR, label="target + draft preset",
                           visible=bool(PAIRS), min_width=200, elem_id="pair",
                           info="sets the model and every lane's draft_model (the Hub must be reachable)")
        seed = gr.Number(value=0, label="seed", precision=0, minimum=0, min_width=120)
        seeds = gr.Number(value=1, label="seeds per lane", precision=0, minimum=1, maximum=POLICY.max_seeds,
                          min_width=120, elem_id="seeds",
                          info="runs each lane with seeds s, s+1, ...: the summary shows mean ± 95 % interval")
        max_new = gr.Slider(1, MAX_NEW_TOKENS_CAP, value=min(64, MAX_NEW_TOKENS_CAP), step=1, label="max new tokens",
                            min_width=240)
    with gr.Row():
        add_btn = gr.Button("+ lane", size="sm")
        remove_btn = gr.Button("− lane", size="sm")
        baseline_btn = gr.Button("+ greedy baseline", size="sm")
        with gr.Column(scale=2, min_width=260):
            color_by = gr.Radio(["probability", "entropy", "origin"], value="probability",
                                label="colour tokens by (origin: plain / accepted draft / bonus)")
            color_key = gr.HTML(color_legend_html("probability"), elem_id="color-key")
    with gr.Accordion("Look inside: logit lens and attention (each costs a second pass per token)", open=False):
        with gr.Row():
            lens = gr.Checkbox(value=False, label="record logit lens", elem_id="record-lens", min_width=160)
            attention = gr.Checkbox(value=False, label="record attention", elem_id="record-attention",
                                    min_width=160)
            attention_layers = gr.Textbox(value="", label="attention layers (e.g. 0-11; empty: all)",
                                          max_length=32, min_width=200)
    with gr.Row(equal_height=False):
        lanes = [Lane.build(index, visible=index < min(2, MAX_LANES), load=blocks.load) for index in range(MAX_LANES)]
    with gr.Accordion("What if: click a token in a lane, pick another token, branch", open=False,
                      elem_id="what-if"):
        with gr.Row():
            branch_lane = gr.Number(value=None, label="lane", precision=0, minimum=1, maximum=MAX_LANES,
                                    elem_id="branch-lane", min_width=90)
            branch_step = gr.Number(value=None, label="step", precision=0, minimum=0, elem_id="branch-step",
                                    min_width=90)
            branch_token = gr.Dropdown(choices=[], label="token there instead (recorded alternatives)",
                                       allow_custom_value=True, elem_id="branch-token", min_width=220,
                                       info="or type a token's text or id")
            branch_strategy = gr.Dropdown([SAME_STRATEGY, *strategy_names()], value=SAME_STRATEGY,
                                          label="decode on with", elem_id="branch-strategy", min_width=180)
            branch_btn = gr.Button("Branch", elem_id="branch", min_width=100)
    summary = gr.HTML("", elem_id="lane-summary")
    with gr.Accordion("copy this table as Markdown or LaTeX", open=False):
        with gr.Row():
            summary_markdown = gr.Code("", language="markdown", label="Markdown", elem_id="summary-markdown")
            summary_latex = gr.Code("", language="latex", label="LaTeX", elem_id="summary-latex")
    link = gr.Markdown("", elem_id="permalink")
    with gr.Accordion("Export every view for a paper (SVG, PDF, PNG)", open=False):
        with gr.Row():
            figure_width = gr.Radio(["one", "two"], value="one", label="paper column width")
            figures_btn = gr.Button("Export all views", size="sm")
            figures_file = gr.File(label="views (zip)", interactive=False, elem_id="figures-zip", height=90)
    first_lanes = [str(i + 1) for i in range(min(2, MAX_LANES))]
    view_lane = gr.Radio(first_lanes, value="1", label="lane shown in the per-lane views", elem_id="view-lane")
    plots: dict[str, gr.Plot] = {}
    for tab in dict.fromkeys(view.tab for view in VIEWS):
        with gr.Tab(tab):
            plots |= {v.name: gr.Plot(label=v.label, show_label=False, elem_id=v.name) for v in VIEWS if v.tab == tab}
    views = [plots[v.name] for v in VIEWS]  # in the catalog's order, whatever order the tabs lay them out in
    page = Page(decode=decode, prompt=prompt, chat=chat, system=system, model_id=model_id, seed=seed, seeds=seeds,
                max_new=max_new, color_by=color_by, view_lane=view_lane, lane_count=gr.State(len(first_lanes)),
                traces=gr.State([]), repeats=gr.State({}),
                link=link, tabs=tabs, add_btn=add_btn, remove_btn=remove_btn, baseline_btn=baseline_btn,
                run_btn=run_btn, stop_btn=stop_btn, summary=summary, summary_markdown=summary_markdown,
                summary_latex=summary_latex, lanes=lanes, views=views,
                probes={"lens": lens, "attention": attention, "attention_layers": attention_layers},
                branching={"lane": branch_lane, "step": branch_step, "token": branch_token,
                           "strategy": branch_strategy, "button": branch_btn})

    run_event = run_btn.click(page.run, page.run_inputs, page.run_outputs, concurrency_limit=CONCURRENCY,
                              api_visibility="private")
    branch_event = branch_btn.click(page.branch, {*page.run_inputs, page.traces, branch_lane, branch_step,
                                                 branch_token, branch_strategy},
                                    page.branch_outputs, concurrency_limit=CONCURRENCY,
                                    api_visibility="private", api_name="branch_lane")
    for lane in lanes:
        lane.output.click(page.pick_token(lane.index), page.traces, [branch_lane, branch_step, branch_token],
                          queue=False, api_visibility="private")
    branch_step.input(page.choose_step, [page.traces, branch_lane, branch_step], branch_token, queue=False,
                      api_visibility="private")
    stop_btn.click(page.stop, [page.traces, color_by, view_lane], page.run_outputs,
                   cancels=[run_event, branch_event], queue=False, api_visibility="private")
    add_btn.click(lambda n, v: page.change_lanes(n, +1, v), [page.lane_count, view_lane], page.lane_controls,
                  queue=False)
    remove_btn.click(lambda n, v: page.change_lanes(n, -1, v), [page.lane_count, view_lane], page.lane_controls,
                     queue=False)
    baseline_btn.click(page.add_greedy_baseline, [page.lane_count, view_lane],
                       [*page.lane_controls, *(lane.strategy for lane in lanes)], queue=False)
    color_by.change(page.render_lanes, [page.traces, color_by], page.lane_outputs, queue=False)
    color_by.change(color_legend_html, color_by, color_key, queue=False)
    view_lane.change(page.render_views, [page.traces, view_lane], views)
    figures_btn.click(export_views, [page.traces, view_lane, figure_width], figures_file)
    # queued, not queue=False: a queued event's reply names the states it changed, which redraws the lanes' controls
    pair.change(lambda name, *chosen: choose_pair(name, model_id, lanes, chosen), [pair, *(x.chosen for x in lanes)],
                [model_id, *(c for lane in lanes for c in (lane.chosen, lane.redraw))])
    return page


def choose_pair(name: str, model_box: Any, lanes: list[Lane], chosen: tuple[Any, ...]) -> dict[Any, Any]:
    """A preset sets the target model and, in every lane, the draft model of every strategy that has one;
    '(none)' leaves them as they are."""
    pair = find_pair(name, PAIRS)
    if pair is None:
        return {}
    out: dict[Any, Any] = {model_box: pair.target}
    for lane, values in zip(lanes, chosen, strict=True):
        values = dict(values or {})
        for strategy in draft_model_strategies():
            values[strategy] = {**values.get(strategy, {}), "draft_model": pair.draft}
        out |= {lane.chosen: values, lane.redraw: time.monotonic_ns()}
    return out

