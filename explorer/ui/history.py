"""The History tab: the stored runs a visitor may see (`Viewer`), filtered as the filters change; open them side by
side in the Compare tab, export them, or delete one's own (after a confirmation)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from explorer.request import parse_run_ids
from explorer.serving import Viewer
from explorer.ui.context import MAX_LANES, fail, store, strategy_names, viewer_of

if TYPE_CHECKING:
    from explorer.ui.compare import Page

HISTORY_HEADERS = ["run_id", "created (UTC)", "strategy", "model", "status", "tokens", "prompt", "output"]
EXPORTERS = {"CSV": ("steps.csv", "write_csv"), "Parquet": ("steps.parquet", "write_parquet"),
             "JSONL": ("events.jsonl", "write_jsonl")}


def history_rows(strategy: str, model: str, search: str, request: gr.Request = None) -> list[list[Any]]:
    """The runs this session may see (its own and those shared with it; everyone's with the public gallery)."""
    return rows_seen_by(viewer_of(request), strategy, model, search)


def rows_seen_by(viewer: Viewer, strategy: str, model: str, search: str) -> list[list[Any]]:
    rows = store().list_runs(strategy=None if strategy in (None, "", "(any)") else strategy, model=model or None,
                             text=search or None, limit=200, viewer=viewer)
    return [[r.run_id, r.created_at.replace("T", " ")[:19], r.strategy, r.model_id, r.status, r.new_tokens,
             r.prompt[:80], r.text[:80]] for r in rows]


def export_runs(run_ids: str, kind: str, request: gr.Request = None) -> list[str]:
    """Write the selected runs (those this session may see) in one export format; return the files."""
    from explorer import export

    ids = parse_run_ids(run_ids)
    if not ids:
        raise fail("select or type the run ids to export first")
    allowed = viewer_of(request).visible(store().owners(ids), ids)
    if len(allowed) < len(ids):
        missing = next(run_id for run_id in ids if run_id not in allowed)
        raise fail(f"no run with id {missing!r} among the runs you can see")
    try:
        traces = store().load_traces(ids)
        folder = Path(tempfile.mkdtemp(prefix="explorer-export-"))
        if kind == "Bundle":
            return [str(export.write_bundle(t, folder / f"run-{export.safe_name(t.run_id)}.zip")) for t in traces]
        name, writer = EXPORTERS[kind]
        return [str(getattr(export, writer)(traces, folder / name))]
    except ValueError as error:
        raise fail(error) from None


def pick_history_row(table: Any, current: str, event: gr.SelectData) -> str:
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    run_id = str(table.iloc[row, 0]) if hasattr(table, "iloc") else str(table[row][0])
    ids = parse_run_ids(current)
    if run_id not in ids:
        ids.append(run_id)
    return ",".join(ids[-MAX_LANES:])


def ask_to_delete(run_ids: str) -> tuple[Any, str]:
    """Deleting asks first: it cannot be undone."""
    ids = parse_run_ids(run_ids)
    if not ids:
        raise fail("select or type the run ids to delete first")
    return gr.Row(visible=True), f"Delete {len(ids)} run(s) for good: {', '.join(ids)}?"


def delete_runs(run_ids: str, strategy: str, model: str, search: str, request: gr.Request = None
                ) -> tuple[str, list[list[Any]]]:
    """Delete the selected runs that this session owns (others' runs are never deleted from here)."""
    ids = parse_run_ids(run_ids)
    if not ids:
        raise fail("select or type the run ids to delete first")
    viewer = viewer_of(request)
    deleted = sum(store().delete_run(run_id, viewer) for run_id in ids)
    gr.Info(f"deleted {deleted} run(s)" + (f"; {len(ids) - deleted} not yours or gone" if deleted < len(ids) else ""))
    return "", rows_seen_by(viewer, strategy, model, search)


def history_tab(page: Page) -> None:
    """The tab's layout and events; its runs open in `page`, the Compare tab."""
    with gr.Row():
        strategy = gr.Dropdown(["(any)", *strategy_names()], value="(any)", label="strategy")
        model = gr.Textbox(label="model contains")
        search = gr.Textbox(label="prompt or output contains")
        refresh_btn = gr.Button("Refresh")
    history = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, wrap=True, elem_id="history",
                           column_widths=["9%", "12%", "10%", "13%", "6%", "6%", "22%", "22%"])
    with gr.Row():
        selected_ids = gr.Textbox(label="run ids (click rows to add)", scale=3, elem_id="run-ids")
        open_btn = gr.Button("Open side by side", variant="primary")
        delete_btn = gr.Button("Delete", variant="stop")
    with gr.Row(visible=False) as confirm_row:
        confirm_text = gr.Markdown("")
        confirm_btn = gr.Button("Yes, delete them", variant="stop", elem_id="confirm-delete")
        cancel_btn = gr.Button("Keep them", elem_id="cancel-delete")
    with gr.Row():
        export_kind = gr.Radio(["CSV", "Parquet", "JSONL", "Bundle"], value="CSV",
                               label="export the selected runs (per-step table, events, run bundles)")
        export_btn = gr.Button("Export")
    exported = gr.File(label="download", file_count="multiple", interactive=False, elem_id="exported", height=110)

    filters = [strategy, model, search]
    refresh_btn.click(history_rows, filters, history)
    page.tabs.select(history_rows, filters, history)  # a fresh list whenever a tab opens
    strategy.change(history_rows, filters, history)  # filters apply as they change
    for box in (model, search):
        box.submit(history_rows, filters, history)
        box.change(history_rows, filters, history, show_progress="hidden")
    history.select(pick_history_row, [history, selected_ids], selected_ids)
    open_btn.click(page.open_runs, [selected_ids, page.color_by, page.view_lane], page.opened_outputs)
    delete_btn.click(ask_to_delete, selected_ids, [confirm_row, confirm_text])
    cancel_btn.click(lambda: gr.Row(visible=False), None, confirm_row)
    confirm_btn.click(delete_runs, [selected_ids, *filters], [selected_ids, history]).then(
        lambda: gr.Row(visible=False), None, confirm_row)
    export_btn.click(export_runs, [selected_ids, export_kind], exported)

