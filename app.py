"""Decoding Explorer, the Gradio app: the page's tabs laid out, the API, and the launch. The tabs are in
explorer/ui (compare.py, history.py, and context.py: the settings, the store and who is asking, which they share
with this file); the work happens in explorer/, viz/ and store/.

Settings (environment): those of explorer/ui/context.py (model, database, concurrency, bundle folder, and the
limits, model allow-list and public gallery of explorer/serving.py), DECODING_EXPLORER_GPU_MAX_S and
DECODING_EXPLORER_GPU_S_PER_TOKEN (ZeroGPU call durations), DECODING_EXPLORER_PLUGINS (the owner's plugins,
explorer/plugins.py, loaded when the page is built), GRADIO_SERVER_PORT / GRADIO_SERVER_NAME.
Every run is owned by the browser session (or API client session) that made it; who may see, open, export and
delete it is decided in explorer/viewer.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from explorer.branch import branch_request
from explorer.lanes import LaneEvent, lane_events, run_lanes
from explorer.metrics import jsonable
from explorer.models import MODEL_CACHE
from explorer.plugins import load_plugins, specs_from_env
from explorer.request import RunRequest, check_max_new_tokens
from explorer.ui.compare import Page, compare_tab
from explorer.ui.context import CONCURRENCY, DEFAULT_MODEL, MAX_NEW_TOKENS_CAP, POLICY, fail, load_runs, store
from explorer.ui.history import history_tab
from explorer.viewer import owner_of

log = logging.getLogger("decoding_explorer.app")

ZERO_GPU_MAX_S = int(os.environ.get("DECODING_EXPLORER_GPU_MAX_S", "120"))  # a ZeroGPU call's longest duration
GPU_S_PER_TOKEN = float(os.environ.get("DECODING_EXPLORER_GPU_S_PER_TOKEN", "0.1"))
try:  # Hugging Face ZeroGPU: the decoding runs in a GPU worker the `spaces` package forks per call
    import spaces
except ImportError:  # anywhere else the same code runs in this process
    spaces = None
ZERO_GPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
API_PROGRESS_EVERY_S = 1.0
MODELS = MODEL_CACHE

CSS = """
.fidelity-entry { font-size: 12px; }
.fidelity-entry summary { cursor: pointer; color: #0072B2; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px; overflow-wrap: anywhere; }
#lane-summary { overflow-x: auto; }
#history th, #history th * { white-space: nowrap !important; word-break: keep-all !important; }
.tok { border-radius: 3px; padding: 1px 0; cursor: pointer; position: relative; }
.tok .pop { display: none; position: absolute; z-index: 60; top: 1.7em; left: 0; width: 280px; background: #fff;
  color: #111; border: 1px solid #bbb; border-radius: 6px; padding: 6px 8px; white-space: normal; line-height: 1.4;
  font-size: 12px; box-shadow: 0 4px 14px rgba(0, 0, 0, 0.18); cursor: text; user-select: text; }
.tok:focus .pop, .tok:focus-within .pop { display: block; }
.tok:focus { outline: 2px solid #D55E00; }
.bars { display: block; margin-top: 4px; }
.bar-row { display: grid; grid-template-columns: 80px 1fr 42px; gap: 6px; align-items: center; }
.bar-row.chosen { font-weight: bold; }
.bar-text { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar { display: inline-block; height: 8px; background: #56B4E9; border-radius: 2px; min-width: 1px; }
.bar-row.chosen .bar { background: #D55E00; }
.lane-metrics { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; }
.run-status { color: #D55E00; font-weight: bold; margin-top: 4px; }
.color-key { display: flex; align-items: center; gap: 8px; font-size: 12px; margin-top: 4px; }
.key-ramp { display: inline-block; width: 120px; height: 12px; border-radius: 3px; }
.key-swatch { border-radius: 3px; padding: 1px 6px; }
.lane-warning { color: #8a5a00; background: #fff4d6; border-radius: 4px; padding: 4px 6px; font-size: 12px; }
.lane-summary { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
.lane-summary th, .lane-summary td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; }
.lane-summary th:first-child, .lane-summary td:first-child { text-align: left; }
"""


def gpu_duration(model_id: str, requests: list[RunRequest]) -> int:
    """Seconds of GPU a ZeroGPU call asks for, sized from its lanes' token budgets (bounded)."""
    return int(min(ZERO_GPU_MAX_S, 15 + GPU_S_PER_TOKEN * sum(r.max_new_tokens for r in requests)))


def decode(model_id: str, requests: list[RunRequest]) -> Iterator[list[LaneEvent]]:
    """The lanes' events, round by round. Under ZeroGPU this runs in the GPU worker that `spaces` forks for the
    call (the model was loaded at import) and every round comes back pickled: plain events only; the database
    is written in this process, by `run_lanes`. Elsewhere it runs here, unchanged."""
    yield from lane_events(MODELS.get(model_id), requests)


if spaces is not None:
    decode = spaces.GPU(duration=gpu_duration)(decode)  # off ZeroGPU the decorator returns `decode` itself
if ZERO_GPU:  # ZeroGPU forks a worker per call from this process: the model must be loaded before, at import
    MODELS.get(DEFAULT_MODEL)


def decoded_lanes(model_id: str, requests: list[RunRequest], owner: str) -> Iterator[list[Any]]:
    """Run lanes through `decode`, recording them here (one place for the page and the API)."""
    model = MODELS.get(model_id)
    return run_lanes(model, requests, store=store(), owner=owner, events=lambda _model, runs: decode(model_id, runs))


def parse_params(params: str) -> dict[str, Any]:
    try:
        parsed = json.loads(params or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"params is not valid JSON ({error.msg}): use e.g. {{\"top_p\": 0.9}}") from None
    if not isinstance(parsed, dict):
        raise ValueError('params must be a JSON object, e.g. {"top_p": 0.9}')
    return parsed


def api_run(run: RunRequest, model_id: str, owner: str) -> Iterator[dict]:
    """One API run: progress at its first token and then about once a second, then its result. A client that
    cancels or disconnects stops being served, so its run stops computing (and is stored as cancelled)."""
    last, reported = time.perf_counter(), 0
    results = []
    with POLICY.visitor_run(owner):
        for results in decoded_lanes(model_id, [run], owner):
            trace = results[0].trace
            steps = len(trace.token_steps) if trace is not None else 0
            if steps and (not reported or time.perf_counter() - last >= API_PROGRESS_EVERY_S):
                last, reported = time.perf_counter(), steps
                yield {"run_id": trace.run_id, "status": "running", "new_tokens": steps}
    if results and results[0].error:
        raise ValueError(f"the run failed: {results[0].error} (stored as failed)")
    trace = results[0].trace
    yield {"run_id": trace.run_id, "text": trace.text, "token_ids": trace.token_ids,
           "metrics": jsonable(trace.metrics()), "parent_run": trace.started.parent_run,
           "parent_step": trace.started.parent_step}


def generate(prompt: str, strategy: str = "greedy", params: str = "{}", model: str = "", seed: int = 0,
             max_new_tokens: int = 64, chat: bool = True, request: gr.Request = None) -> Iterator[dict]:
    """API: one run with one strategy; the last value is its run id, text, generated token ids and metrics.
    While it runs it reports progress at its first token and then about once a second: a client that cancels or
    disconnects stops being served, so its run stops computing (and is stored as cancelled)."""
    try:
        run = POLICY.limit(RunRequest.build(strategy, parse_params(params), prompt, seed=seed,
                                            max_new_tokens=check_max_new_tokens(max_new_tokens, MAX_NEW_TOKENS_CAP)))
        model_id = POLICY.check_model(model or DEFAULT_MODEL)
        lm = MODELS.get(model_id)
        yield from api_run(run.replace(chat=bool(chat) and lm.has_chat_template), model_id, owner_of(request))
    except ValueError as error:
        raise fail(error) from None


def branch(run_id: str, step: int, token: str, strategy: str = "", params: str = "{}", model: str = "",
           request: gr.Request = None) -> Iterator[dict]:
    """API, what if: continue the stored run `run_id` (one you can see) from `step` with `token` there (a recorded
    alternative's text, any text that is one token, or a token id), with its own strategy (empty) or another
    with `params`. The last value is the branch's run id, text, token ids, metrics and its parent link."""
    try:
        parents, viewer = load_runs(run_id, request)
        parent = parents[0]
        model_id = POLICY.check_model(model or DEFAULT_MODEL)
        run = POLICY.limit(branch_request(MODELS.get(model_id), parent, int(step), str(token), strategy or None,
                                          parse_params(params) if strategy else None))
        yield from api_run(run, model_id, viewer.owner)
    except (TypeError, ValueError) as error:
        raise fail(error) from None


def build() -> tuple[gr.Blocks, Page]:
    # The owner's plugins, before the page lists the strategies and views: from the environment and installed
    # packages only, once, at start; no request can name one (loading a plugin runs its code).
    failures = load_plugins(specs_from_env())
    for failure in failures:
        log.warning(failure)
    with gr.Blocks(title="Decoding Explorer") as blocks:
        gr.Markdown("## Decoding Explorer\nRun decoding strategies side by side; every step is recorded.")
        if failures:
            gr.Markdown(f"{len(failures)} plugin(s) did not load: the server's log names them and says why.",
                        elem_classes=["lane-warning"])
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare"):
                page = compare_tab(tabs, blocks, decoded_lanes)
            with gr.Tab("History", id="history"):
                history_tab(page)
        blocks.load(page.on_load, [page.color_by, page.view_lane], page.opened_outputs)
        gr.api(generate, api_name="generate")
        gr.api(branch, api_name="branch")
    return blocks, page


demo, PAGE = build()


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
