"""What app.py and its tabs share: the server's settings and policy, the store, who is asking (`viewer_of`),
opening stored runs by id (which shares them with the visitor), and the page's one-line errors.

Settings (environment): DECODING_EXPLORER_MODEL (default model: "embedded", an HF id or a local path),
DECODING_EXPLORER_DB (SQLAlchemy URL), DECODING_EXPLORER_CONCURRENCY (runs decoding at once, default 1),
DECODING_EXPLORER_BUNDLE_DIR (a folder every finished run is mirrored to as a bundle), and the limits, model
allow-list and public gallery of explorer/serving.py. Who may see a run is decided in explorer/viewer.py.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import gradio as gr

from explorer.request import parse_run_ids
from explorer.serving import ServerPolicy, Viewer
from explorer.strategies import REGISTRY
from explorer.trace import Trace
from explorer.viewer import Shares, owner_of
from store import Store

CONCURRENCY = int(os.environ.get("DECODING_EXPLORER_CONCURRENCY", "1"))
DEFAULT_MODEL = os.environ.get("DECODING_EXPLORER_MODEL", "embedded")
POLICY = ServerPolicy.from_env(default_model=DEFAULT_MODEL)
MAX_LANES = POLICY.max_lanes  # the page has this many lanes (at most 4)
MAX_NEW_TOKENS_CAP = POLICY.max_new_tokens
BUNDLE_DIR = os.environ.get("DECODING_EXPLORER_BUNDLE_DIR") or None
SHARES = Shares()  # the runs each visitor opened by permalink or by id (a permalink is a share)
_STORE: Store | None = None
_STORE_LOCK = threading.Lock()


def strategy_names() -> list[str]:
    """Every registered strategy, by name: the built-ins and the plugins loaded when the page was built."""
    return sorted(REGISTRY)


def store() -> Store:
    global _STORE
    with _STORE_LOCK:
        if _STORE is None:
            _STORE = Store(bundle_dir=BUNDLE_DIR)
        return _STORE


def fail(error: Exception | str) -> gr.Error:
    """A one-line message in the page, never a traceback."""
    return gr.Error(str(error), print_exception=False)


def viewer_of(request: Any) -> Viewer:
    """Who asks (a `gr.Request`), and what they may see: built once per request, after the runs it opens are shared."""
    owner = owner_of(request)
    return POLICY.viewer(owner, SHARES.of(owner))


def load_runs(run_ids: str, request: Any) -> tuple[list[Trace], Viewer]:
    """Stored runs to open side by side, and the `Viewer` of the request (`gr.Request`): opening a run by its id
    shares it with the visitor, so the viewer sees them."""
    ids = parse_run_ids(run_ids)
    if not ids:
        raise fail("select or type one or more run ids first")
    if len(ids) > MAX_LANES:
        raise fail(f"open at most {MAX_LANES} runs side by side")
    try:
        traces = store().load_traces(ids)
    except ValueError:
        missing = next(run_id for run_id in ids if run_id not in store().owners(ids))
        raise fail(f"no run with id {missing!r}: the History tab lists the runs you can open") from None
    SHARES.add(owner_of(request), ids)
    return traces, viewer_of(request)
