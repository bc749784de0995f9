"""Decoding Explorer, the Gradio app: layout and wiring only. The work happens in explorer/, viz/ and store/.

Settings (environment): DECODING_EXPLORER_MODEL (default model: "embedded", an HF id or a local path),
DECODING_EXPLORER_DB (SQLAlchemy URL), DECODING_EXPLORER_MAX_NEW_TOKENS (cap, default 512),
DECODING_EXPLORER_CONCURRENCY (runs decoding at once, default 1), GRADIO_SERVER_PORT / GRADIO_SERVER_NAME.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from explorer.compare import LaneSpec, run_lanes
from explorer.models import MODEL_CACHE
from explorer.recorder import Recorder
from explorer.runner import run_to_end
from explorer.strategies import REGISTRY, make_config
from explorer.strategies.base import field_type
from store import Store
from viz import metrics_html, tokens_html
from viz.catalog import BEAM_STRATEGIES, VIEW_NAMES, VIEWS, render_all

log = logging.getLogger("decoding_explorer.app")

MAX_LANES = 4
MAX_NEW_TOKENS_CAP = int(os.environ.get("DECODING_EXPLORER_MAX_NEW_TOKENS", "512"))
CONCURRENCY = int(os.environ.get("DECODING_EXPLORER_CONCURRENCY", "1"))
DEFAULT_MODEL = os.environ.get("DECODING_EXPLORER_MODEL", "embedded")
STRATEGY_NAMES = sorted(REGISTRY)
DEFAULT_LANES = ["greedy", "sample", "mirostat", "top_h"]
STREAM_EVERY_S = 0.25
MODELS = MODEL_CACHE
_STORE: Store | None = None
_STORE_LOCK = threading.Lock()
CSS = """
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px; }
.tok { border-radius: 3px; padding: 1px 0; cursor: help; }
.lane-metrics { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; }
.run-status { color: #D55E00; font-weight: bold; margin-top: 4px; }
"""


def store() -> Store:
    global _STORE
    with _STORE_LOCK:
        if _STORE is None:
            _STORE = Store()
        return _STORE


# --------------------------------------------------------------------------------- controls from configs
def make_control(config: type, spec: dataclasses.Field) -> gr.components.Component:
    kind, meta = field_type(config, spec.name), spec.metadata
    label, info = spec.name, meta.get("help")
    if kind is bool:
        return gr.Checkbox(value=spec.default, label=label, info=info)
    if kind is str and "choices" not in meta:
        return gr.Textbox(value=spec.default, label=label, info=info)
    if "choices" in meta:
        return gr.Dropdown(choices=list(meta["choices"]), value=spec.default, label=label, info=info)
    if kind in (int, float) and "minimum" in meta and "maximum" in meta:
        return gr.Slider(meta["minimum"], meta["maximum"], value=spec.default, step=meta.get("step"),
                         label=label, info=info)
    return gr.Number(value=spec.default, label=label, info=info, precision=0 if kind is int else None)


CONTROL_KEYS = [(name, f.name) for name in STRATEGY_NAMES for f in dataclasses.fields(REGISTRY[name].config)]


def lane_specs(lane_count: int, lane_values: list[Any]) -> list[LaneSpec]:
    """Turn the flat list of lane inputs (strategy, then every control) into LaneSpecs."""
    width = 1 + len(CONTROL_KEYS)
    specs = []
    for lane in range(lane_count):
        values = lane_values[lane * width:(lane + 1) * width]
        strategy, controls = values[0], dict(zip(CONTROL_KEYS, values[1:], strict=True))
        params = {field: controls[(name, field)] for name, field in CONTROL_KEYS if name == strategy}
        specs.append(LaneSpec(strategy, params))
    return specs


# ------------------------------------------------------------------------------------------ rendering
def render_lanes(traces: list[Any], color_by: str) -> list[str]:
    baseline = next((t for t in traces if t is not None and t.started.strategy == "greedy"), None)
    html_out, metrics_out = [], []
    for lane in range(MAX_LANES):
        trace = traces[lane] if lane < len(traces) else None
        html_out.append(tokens_html(trace, color_by))
        metrics_out.append(metrics_html(trace, baseline if baseline is not trace else None))
    return html_out + metrics_out


VIEW_COUNT = len(VIEWS)
BEAM_VIEW = VIEW_NAMES.index("beam-tree")  # the beam tree also updates while a search runs


def render_views(traces: list[Any], view_lane: str) -> list[Any]:
    return render_all(traces, int(view_lane) - 1)


def permalink(traces: list[Any]) -> str:
    ids = ",".join(t.run_id for t in traces if t is not None)
    return f"Permalink: [?compare={ids}](?compare={ids})" if ids else ""


# ----------------------------------------------------------------------------------------------- handlers
def run_handler(prompt: str, chat: bool, system: str, model_id: str, seed: float, max_new: float, color_by: str,
                heatmap_lane: str, lane_count: int, *lane_values: Any):
    try:
        max_new_tokens = int(max_new)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_CAP:
            raise ValueError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS_CAP}")
        if seed is None or seed < 0:
            raise ValueError("seed must be a whole number >= 0")
        specs = lane_specs(int(lane_count), list(lane_values))
        model = MODELS.get(model_id or DEFAULT_MODEL)
        lanes = run_lanes(model, specs, prompt, chat=chat, system_prompt=system or None,
                          max_new_tokens=max_new_tokens, seed=int(seed), store=store())
        last = last_tree = 0.0
        results = []
        searching = any(spec.strategy in BEAM_STRATEGIES for spec in specs)
        for results in lanes:
            if time.perf_counter() - last >= STREAM_EVERY_S:
                last = time.perf_counter()
                traces = [r.trace for r in results]
                views: list[Any] = [gr.skip()] * VIEW_COUNT
                if searching and last - last_tree >= 0.6:  # the beam tree grows live
                    last_tree = last
                    views[BEAM_VIEW] = VIEWS[BEAM_VIEW].render(traces, int(heatmap_lane) - 1)
                yield *render_lanes(traces, color_by), *views, gr.skip(), gr.skip()
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None
    for result in results:
        if result.error:
            gr.Warning(f"a lane failed: {result.error} (stored as failed)")
    traces = [r.trace for r in results]
    yield *render_lanes(traces, color_by), *render_views(traces, heatmap_lane), traces, permalink(traces)


def rerender(traces: list[Any], color_by: str, heatmap_lane: str):
    return *render_lanes(traces, color_by), *render_views(traces, heatmap_lane)


def open_runs(run_ids: str, color_by: str, heatmap_lane: str):
    ids = [part.strip() for part in (run_ids or "").replace(" ", ",").split(",") if part.strip()]
    if not ids:
        raise gr.Error("select or type one or more run ids first", print_exception=False)
    if len(ids) > MAX_LANES:
        raise gr.Error(f"open at most {MAX_LANES} runs side by side", print_exception=False)
    try:
        traces = store().load_traces(ids)
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None
    strategies = [gr.update(value=t.started.strategy) for t in traces] + [gr.skip()] * (MAX_LANES - len(traces))
    return (*rerender(traces, color_by, heatmap_lane), traces, permalink(traces), len(traces),
            *lane_visibility(len(traces)), *strategies, gr.Tabs(selected="compare"))


OPENED_COUNT = 2 * MAX_LANES + VIEW_COUNT + 3 + 2 * MAX_LANES + 1  # see `opened` in build()


def nothing_opened() -> tuple[Any, ...]:
    return (gr.skip(),) * OPENED_COUNT


def on_load(color_by: str, heatmap_lane: str, request: gr.Request):
    params = dict(request.query_params) if request is not None else {}
    ids = params.get("compare") or params.get("run")
    if not ids:
        return nothing_opened()
    try:
        return open_runs(ids, color_by, heatmap_lane)
    except gr.Error as error:
        gr.Warning(f"permalink: {error.message}")
        return nothing_opened()


def lane_visibility(count: int) -> list[Any]:
    return [gr.Column(visible=lane < count) for lane in range(MAX_LANES)]


def change_lanes(count: int, delta: int):
    count = min(max(int(count) + delta, 1), MAX_LANES)
    return count, *lane_visibility(count)


def add_greedy_baseline(count: int):
    """Open one more lane set to greedy: the baseline that speedups are measured against."""
    if int(count) >= MAX_LANES:
        raise gr.Error(f"all {MAX_LANES} lanes are in use: remove one first", print_exception=False)
    count = int(count) + 1
    dropdowns = [gr.update(value="greedy") if lane == count - 1 else gr.skip() for lane in range(MAX_LANES)]
    return count, *lane_visibility(count), *dropdowns


def strategy_groups(strategy: str) -> list[Any]:
    return [gr.Group(visible=name == strategy) for name in STRATEGY_NAMES]


HISTORY_HEADERS = ["run_id", "created (UTC)", "strategy", "model", "status", "tokens", "prompt", "output"]


def history_rows(strategy: str, model: str, search: str) -> list[list[Any]]:
    rows = store().list_runs(strategy=None if strategy in (None, "", "(any)") else strategy, model=model or None,
                             text=search or None, limit=200)
    return [[r.run_id, r.created_at.replace("T", " ")[:19], r.strategy, r.model_id, r.status, r.new_tokens,
             r.prompt[:80], r.text[:80]] for r in rows]


def pick_history_row(table: Any, current: str, event: gr.SelectData) -> str:
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    run_id = str(table.iloc[row, 0]) if hasattr(table, "iloc") else str(table[row][0])
    ids = [part.strip() for part in (current or "").split(",") if part.strip()]
    if run_id not in ids:
        ids.append(run_id)
    return ",".join(ids[-MAX_LANES:])


def delete_runs(run_ids: str, strategy: str, model: str, search: str):
    ids = [part.strip() for part in (run_ids or "").split(",") if part.strip()]
    if not ids:
        raise gr.Error("select or type the run ids to delete first", print_exception=False)
    deleted = sum(store().delete_run(run_id) for run_id in ids)
    gr.Info(f"deleted {deleted} run(s)")
    return "", history_rows(strategy, model, search)


EXPORTERS = {"CSV": ("steps.csv", "write_csv"), "Parquet": ("steps.parquet", "write_parquet"),
             "JSONL": ("events.jsonl", "write_jsonl")}


def export_runs(run_ids: str, kind: str) -> list[str]:
    """Write the selected runs in one of the export formats; return the files to download."""
    from explorer import export

    ids = [part.strip() for part in (run_ids or "").split(",") if part.strip()]
    if not ids:
        raise gr.Error("select or type the run ids to export first", print_exception=False)
    try:
        traces = store().load_traces(ids)
        folder = Path(tempfile.mkdtemp(prefix="explorer-export-"))
        if kind == "Bundle":
            return [str(export.write_bundle(t, folder / f"run-{t.run_id}.zip")) for t in traces]
        name, writer = EXPORTERS[kind]
        return [str(getattr(export, writer)(traces, folder / name))]
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None


def export_views(traces: list[Any], view_lane: str, width: str) -> str:
    """Every view of the shown lanes in the paper theme, as SVG, PDF and PNG, in one zip."""
    from viz.paper import FORMATS, save_figure

    if not traces:
        raise gr.Error("run or open some lanes first", print_exception=False)
    folder = Path(tempfile.mkdtemp(prefix="explorer-figures-"))
    try:
        for view, figure in zip(VIEWS, render_views(traces, view_lane), strict=True):
            for fmt in FORMATS:
                save_figure(figure, folder / f"{view.name}.{fmt}", width=width)
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None
    archive = shutil.make_archive(str(folder.parent / f"{folder.name}-views"), "zip", folder)
    return archive


def generate(prompt: str, strategy: str = "greedy", params: str = "{}", model: str = "", seed: int = 0,
             max_new_tokens: int = 64, chat: bool = True) -> dict:
    """API: one run with one strategy; returns its run id, text, generated token ids and metrics."""
    try:
        parsed = json.loads(params or "{}")
        if not isinstance(parsed, dict):
            raise ValueError('params must be a JSON object, e.g. {"top_p": 0.9}')
        if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS_CAP:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_CAP}")
        config = make_config(strategy, parsed)
        lm = MODELS.get(model or DEFAULT_MODEL)
        trace = run_to_end(lm, strategy, config, prompt, chat=chat if lm.has_chat_template else False,
                           max_new_tokens=int(max_new_tokens), seed=int(seed), recorder=Recorder(store()))
    except json.JSONDecodeError as error:
        raise gr.Error(f"params is not valid JSON ({error.msg}): use e.g. {{\"top_p\": 0.9}}",
                       print_exception=False) from None
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None
    metrics = {k: v for k, v in trace.metrics().items() if not (isinstance(v, float) and v != v)}
    return {"run_id": trace.run_id, "text": trace.text, "token_ids": trace.token_ids, "metrics": metrics}


# ------------------------------------------------------------------------------------------------- layout
def build() -> gr.Blocks:
    with gr.Blocks(title="Decoding Explorer") as demo:
        traces_state = gr.State([])
        lane_count = gr.State(2)
        gr.Markdown("## Decoding Explorer\nRun decoding strategies side by side; every step is recorded.")
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", lines=3, scale=4, elem_id="prompt",
                                        value="Write a short poem about the sea.")
                    with gr.Column(scale=1):
                        run_btn = gr.Button("Run", variant="primary", elem_id="run")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Row():
                    chat = gr.Checkbox(value=True, label="chat template")
                    system = gr.Textbox(label="System prompt (optional)", scale=2)
                    model_id = gr.Textbox(value=DEFAULT_MODEL, label="Model (embedded, HF id or local path)", scale=2)
                    seed = gr.Number(value=0, label="seed", precision=0, minimum=0)
                    max_new = gr.Slider(1, MAX_NEW_TOKENS_CAP, value=min(64, MAX_NEW_TOKENS_CAP), step=1,
                                        label="max new tokens")
                with gr.Row():
                    add_btn = gr.Button("+ lane", size="sm")
                    remove_btn = gr.Button("− lane", size="sm")
                    baseline_btn = gr.Button("+ greedy baseline", size="sm")
                    color_by = gr.Radio(["probability", "entropy", "origin"], value="probability",
                                        label="colour tokens by (origin: plain / accepted draft / bonus)")
                lane_columns, lane_inputs, lane_html, lane_metrics, strategy_dropdowns = [], [], [], [], []
                with gr.Row(equal_height=False):
                    for lane in range(MAX_LANES):
                        with gr.Column(visible=lane < 2, min_width=260) as column:
                            gr.Markdown(f"**Lane {lane + 1}**")
                            dropdown = gr.Dropdown(STRATEGY_NAMES, value=DEFAULT_LANES[lane], label="strategy",
                                                   elem_id=f"lane{lane + 1}-strategy")
                            groups, controls = [], []
                            with gr.Accordion("parameters", open=False):
                                for name in STRATEGY_NAMES:
                                    with gr.Group(visible=name == DEFAULT_LANES[lane]) as group:
                                        for spec in dataclasses.fields(REGISTRY[name].config):
                                            controls.append(make_control(REGISTRY[name].config, spec))
                                    groups.append(group)
                            dropdown.change(strategy_groups, dropdown, groups, queue=False)
                            lane_html.append(gr.HTML(tokens_html(None), elem_id=f"lane{lane + 1}-output"))
                            lane_metrics.append(gr.HTML("", elem_id=f"lane{lane + 1}-metrics"))
                        lane_columns.append(column)
                        strategy_dropdowns.append(dropdown)
                        lane_inputs += [dropdown, *controls]
                link = gr.Markdown("", elem_id="permalink")
                with gr.Accordion("Export every view for a paper (SVG, PDF, PNG)", open=False):
                    with gr.Row():
                        figure_width = gr.Radio(["one", "two"], value="one", label="paper column width")
                        figures_btn = gr.Button("Export all views", size="sm")
                        figures_file = gr.File(label="views (zip)", interactive=False, elem_id="figures-zip",
                                               height=90)
                heatmap_lane = gr.Radio([str(i + 1) for i in range(MAX_LANES)], value="1",
                                        label="lane shown in the per-lane views")
                views = []
                for tab in dict.fromkeys(view.tab for view in VIEWS):
                    with gr.Tab(tab):
                        views += [gr.Plot(label=v.label, elem_id=v.name) for v in VIEWS if v.tab == tab]
            with gr.Tab("History", id="history"):
                with gr.Row():
                    history_strategy = gr.Dropdown(["(any)", *STRATEGY_NAMES], value="(any)", label="strategy")
                    history_model = gr.Textbox(label="model contains")
                    history_search = gr.Textbox(label="prompt or output contains")
                    refresh_btn = gr.Button("Refresh")
                history = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, wrap=True, elem_id="history")
                with gr.Row():
                    selected_ids = gr.Textbox(label="run ids (click rows to add)", scale=3, elem_id="run-ids")
                    open_btn = gr.Button("Open side by side", variant="primary")
                    delete_btn = gr.Button("Delete", variant="stop")
                with gr.Row():
                    export_kind = gr.Radio(["CSV", "Parquet", "JSONL", "Bundle"], value="CSV",
                                           label="export the selected runs (per-step table, events, run bundles)")
                    export_btn = gr.Button("Export")
                exported = gr.File(label="download", file_count="multiple", interactive=False, elem_id="exported",
                                   height=110)

        lane_outputs = lane_html + lane_metrics
        run_event = run_btn.click(
            run_handler,
            [prompt, chat, system, model_id, seed, max_new, color_by, heatmap_lane, lane_count, *lane_inputs],
            [*lane_outputs, *views, traces_state, link],
            concurrency_limit=CONCURRENCY, api_visibility="private",
        )
        stop_btn.click(None, cancels=[run_event])
        add_btn.click(lambda n: change_lanes(n, +1), lane_count, [lane_count, *lane_columns], queue=False)
        remove_btn.click(lambda n: change_lanes(n, -1), lane_count, [lane_count, *lane_columns], queue=False)
        color_by.change(lambda t, c: render_lanes(t, c), [traces_state, color_by], lane_outputs, queue=False)
        heatmap_lane.change(render_views, [traces_state, heatmap_lane], views)
        baseline_btn.click(add_greedy_baseline, lane_count, [lane_count, *lane_columns, *strategy_dropdowns],
                           queue=False)

        history_filters = [history_strategy, history_model, history_search]
        refresh_btn.click(history_rows, history_filters, history)
        tabs.select(history_rows, history_filters, history)  # fresh list whenever a tab opens
        history.select(pick_history_row, [history, selected_ids], selected_ids)
        opened = [*lane_outputs, *views, traces_state, link, lane_count, *lane_columns, *strategy_dropdowns, tabs]
        open_btn.click(open_runs, [selected_ids, color_by, heatmap_lane], opened)
        delete_btn.click(delete_runs, [selected_ids, *history_filters], [selected_ids, history])
        export_btn.click(export_runs, [selected_ids, export_kind], exported)
        figures_btn.click(export_views, [traces_state, heatmap_lane, figure_width], figures_file)
        demo.load(on_load, [color_by, heatmap_lane], opened)
        gr.api(generate, api_name="generate")
    return demo


demo = build()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Load (and on first start, convert) the default model in the background so the first Run is quick.
    threading.Thread(target=MODELS.get, args=(DEFAULT_MODEL,), daemon=True).start()
    log.info("runs are stored in %s", store().url)
    demo.queue(default_concurrency_limit=CONCURRENCY).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), css=CSS, show_error=False
    )


if __name__ == "__main__":
    main()
