"""Store: lossless round trips, listing, deletion, schema version and migration, batched writes, concurrent
writers; on SQLite and on a real PostgreSQL server (tests/postgres.py starts a throw-away one)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy import text as sql_text

from explorer.events import TokenStep
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_strategy, run_to_end
from explorer.viewer import Viewer
from store import Store
from store.codec import decode, encode
from store.tables import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_is_lossless(any_store, tiny_flat):
    store = any_store
    for name, params in [("sample", {"top_p": 0.8}), ("mirostat", {}), ("top_h", {}), ("greedy", {}),
                         ("speculative", {}), ("beam", {"num_beams": 2})]:
        trace = run_to_end(tiny_flat, RunRequest.build(name, params, "Round <trip> & 'quotes' \u00e9\u4e2d\x00",
                           max_new_tokens=25, seed=4), recorder=Recorder(store, batch_size=7))
        loaded = store.load_trace(trace.run_id)
        assert loaded == trace
        assert loaded.text == trace.text and loaded.metrics() == trace.metrics()


def test_codec_packs_arrays_and_keeps_special_floats():
    step = TokenStep(step=0, position=3, token_id=7, token_text="<b>\u00e9", logprob=-0.1, rank=0, entropy=0.5,
                     top_ids=[7, 2**40], top_logprobs=[-0.1, float("-inf")], top_texts=["a", "b"],
                     kept_top_ids=[], kept_top_logprobs=[], kept_count=1, kept_logprob=0.0,
                     details={"mu": float("nan")})
    kind, fields, blob = encode(step)
    assert blob is not None and len(blob) == 4 * 8
    back = decode(kind, fields, blob)
    assert back.top_ids == step.top_ids and back.top_logprobs == step.top_logprobs
    assert back.token_text == step.token_text


def test_details_keep_plain_json_values_through_the_store_and_the_jsonl(any_store, tiny, tmp_path):
    """A step's details hold plain JSON scalars and flat lists: a flag stays a bool (not 0.0/1.0), a list a list."""
    from explorer.export import read_jsonl, write_jsonl

    trace = run_to_end(tiny, RunRequest.build("instructive", {"epsilon": 1.0}, "Hi", max_new_tokens=4),
                       recorder=Recorder(any_store))
    assert all(isinstance(s.details["flipped"], bool) for s in trace.token_steps)
    step = dataclasses.replace(trace.token_steps[0], details={"flag": True, "set": [3, 1], "label": "x",
                                                              "mixed": [1.5, None, "a"], "mu": 0.25})
    trace.events[trace.events.index(trace.token_steps[0])] = step
    loaded = read_jsonl(write_jsonl([trace], tmp_path / "run.jsonl").read_text().splitlines())[0]  # strict load
    assert loaded.token_steps[0].details == step.details
    assert isinstance(loaded.token_steps[0].details["flag"], bool)
    stored = any_store.load_trace(trace.run_id)
    assert [s.details for s in stored.token_steps[1:]] == [s.details for s in trace.token_steps[1:]]
    assert isinstance(stored.token_steps[0].details["flipped"], bool)


def test_save_trace_into_another_database(db_url, tiny):
    from tests.test_viz import hostile_trace

    trace = run_to_end(tiny, RunRequest.build("greedy", {}, "copy me", max_new_tokens=5))
    other = Store(db_url)
    other.save_trace(trace)
    assert other.load_trace(trace.run_id) == trace
    odd = hostile_trace(trace)  # markup, quotes, NaN-free odd text, a failed status
    odd.started = dataclasses.replace(odd.started, run_id="hostile1")
    other.save_trace(odd)
    assert other.load_trace("hostile1") == odd


def test_list_filter_delete(any_store, tiny):
    store = any_store
    ids = {}
    for name, prompt in [("greedy", "alpha prompt"), ("sample", "beta prompt"), ("greedy", "gamma 100%_x")]:
        trace = run_to_end(tiny, RunRequest.build(name, {}, prompt, max_new_tokens=3), recorder=Recorder(store))
        ids[prompt] = trace.run_id
    assert {r.run_id for r in store.list_runs()} == set(ids.values())
    assert [r.prompt for r in store.list_runs(strategy="sample")] == ["beta prompt"]
    assert [r.prompt for r in store.list_runs(text="100%_")] == ["gamma 100%_x"]
    assert store.list_runs(text="100%x") == []  # % and _ are literal, not wildcards
    assert store.list_runs(model="tiny-random")[0].status == "ok"
    assert store.delete_run(ids["alpha prompt"]) is True
    assert store.delete_run(ids["alpha prompt"]) is False
    with pytest.raises(ValueError, match="no run with id"):
        store.load_trace(ids["alpha prompt"])
    assert store.count_runs() == 2


def test_writes_are_batched(any_store, tiny, monkeypatch):
    store = any_store
    calls = []
    original = store.append_events
    monkeypatch.setattr(store, "append_events", lambda *a, **k: (calls.append(len(a[2])), original(*a, **k)))
    run_to_end(tiny, RunRequest.build("greedy", {}, "batch", max_new_tokens=20), recorder=Recorder(store, 8))
    assert calls == [8, 8, 5]  # 20 tokens and the quality probe


def test_a_running_run_is_visible_with_its_steps_so_far(any_store, tiny):
    store = any_store
    recorder = Recorder(store, batch_size=4)
    events = run_strategy(tiny, RunRequest.build("greedy", {}, "abc", max_new_tokens=30), recorder=recorder)
    for event in events:
        if isinstance(event, TokenStep) and event.step == 9:
            break
    partial = store.load_trace(recorder.trace.run_id)  # a reader while the run is still open
    assert partial.status == "running" and len(partial.token_steps) == 8
    events.close()


def test_schema_version_mismatch_is_refused(db_url):
    store = Store(db_url)
    with store.engine.begin() as connection:
        connection.execute(sql_text("UPDATE meta SET value = '999' WHERE key = 'schema_version'"))
    store.close()
    with pytest.raises(ValueError, match="schema version 999"):
        Store(db_url)


def test_schema_v1_database_is_migrated(db_url):
    blob = "BYTEA" if db_url.startswith("postgresql") else "BLOB"
    engine = create_engine(db_url)
    with engine.begin() as connection:
        for statement in [
            "CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT)",
            "INSERT INTO meta VALUES ('schema_version', '1')",
            "CREATE TABLE runs (id VARCHAR(32) PRIMARY KEY, created_at VARCHAR(32), strategy VARCHAR(64), "
            "model_id VARCHAR(512), prompt TEXT, seed INTEGER, status VARCHAR(16), error TEXT, text TEXT, "
            "new_tokens INTEGER, wall_time_s FLOAT, started TEXT, finished TEXT)",
            "INSERT INTO runs VALUES ('old1', '2025-01-01T00:00:00', 'greedy', 'm', 'p', 0, 'ok', NULL, 't', 0, "
            "0.5, '{}', NULL)",
            "INSERT INTO runs VALUES ('old2', '2025-01-02T00:00:00', 'greedy', 'm', 'p', 0, 'ok', NULL, 't', 0, "
            "0.5, '{\"parent_run\": \"old1\", \"parent_step\": 3}', NULL)",
            f"CREATE TABLE events (run_id VARCHAR(32), seq INTEGER, kind VARCHAR(64), fields TEXT, arrays {blob}, "
            "PRIMARY KEY (run_id, seq))",
        ]:
            connection.execute(sql_text(statement))
    engine.dispose()
    store = Store(db_url)  # v1 -> 2 -> 3 -> 4
    with store.engine.connect() as connection:
        assert connection.execute(sql_text("SELECT value FROM meta")).scalar() == str(SCHEMA_VERSION)
        columns = set(connection.execute(sql_text("SELECT * FROM runs")).keys())
        parents = dict(connection.execute(sql_text("SELECT id, parent_run FROM runs")).all())
    assert {"sweep_key", "owner", "pid", "host", "heartbeat_at", "parent_run"} <= columns
    assert sorted(store.run_ids()) == ["old1", "old2"]
    assert parents == {"old1": None, "old2": "old1"}  # branches stored before v4 keep their parent link
    assert store.family(["old2"]) == ["old1", "old2"]


WRITER = """
import dataclasses, sys
from explorer.events import RunStarted
from explorer.export import read_jsonl
from store import Store
url, tag, path = sys.argv[1:]
trace = read_jsonl(open(path).read().splitlines())[0]
store = Store(url)  # both writers may be the first to open the empty database
for i in range(8):
    started = dataclasses.replace(trace.started, run_id=f"{tag}{i:02d}")
    store.begin_run(started)
    events = trace.events
    for first in range(0, len(events), 3):  # small batches: the two writers' transactions interleave
        last = first + 3 >= len(events)
        store.append_events(started.run_id, first, events[first:first + 3], trace.finished if last else None)
"""


def test_two_processes_append_runs_at_once(db_url, tiny, tmp_path):
    from explorer.export import write_jsonl

    trace = run_to_end(tiny, RunRequest.build("greedy", {}, "two writers", max_new_tokens=12))
    source = write_jsonl([trace], tmp_path / "trace.jsonl")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, tag, str(source)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()[-2000:]
    store = Store(db_url)
    ids = store.run_ids()
    assert sorted(ids) == sorted(f"{tag}{i:02d}" for tag in "ab" for i in range(8))
    for run_id in ids:
        loaded = store.load_trace(run_id)
        assert loaded.events == trace.events and loaded.finished == trace.finished


def test_sqlite_uses_wal(store):
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_the_store_shows_a_viewer_exactly_what_viewer_may_see(any_store, tiny):
    """The store's SQL filter is `Viewer.may_see`, and it deletes only what `Viewer.may_delete` allows: both
    asked of the same runs give the same answers (None: a trusted caller, every run)."""
    store = any_store
    owners = {}
    for owner in ("a", "a", "b", None):  # None: an imported run, nobody's
        trace = run_to_end(tiny, RunRequest.build("greedy", {}, "Hi", max_new_tokens=2),
                           recorder=Recorder(store, owner=owner))
        owners[trace.run_id] = owner
    b_run = next(run_id for run_id, owner in owners.items() if owner == "b")
    viewers = [Viewer("a"), Viewer("a", frozenset([b_run])), Viewer("b"), Viewer("c"), Viewer("c", gallery=True)]
    for viewer, count in zip(viewers, (2, 3, 1, 0, 4), strict=True):
        expected = {run_id for run_id, owner in owners.items() if viewer.may_see(owner, run_id)}
        assert len(expected) == count, viewer
        assert {r.run_id for r in store.list_runs(viewer=viewer)} == expected, viewer
        assert viewer.visible(store.owners(owners), owners) == [r for r in owners if r in expected]
    assert {r.run_id for r in store.list_runs()} == set(owners)
    for run_id, owner in owners.items():
        assert store.delete_run(run_id, Viewer("a", frozenset(owners), gallery=True)) is (owner == "a")
    assert store.count_runs() == 2
