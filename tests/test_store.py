"""Store: lossless round trips, listing, deletion, schema version, batched writes."""

import sqlite3

import pytest

from explorer.events import TokenStep
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_strategy, run_to_end
from store import Store
from store.codec import decode, encode


def test_round_trip_is_lossless(store, tiny_flat):
    for name, params in [("sample", {"top_p": 0.8}), ("mirostat", {}), ("top_h", {}), ("greedy", {})]:
        trace = run_to_end(tiny_flat, RunRequest.build(name, params, "Round <trip> & 'quotes'",
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


def test_save_trace_into_another_database(tmp_path, tiny):
    trace = run_to_end(tiny, RunRequest.build("greedy", {}, "copy me", max_new_tokens=5))
    other = Store(f"sqlite:///{tmp_path / 'other.sqlite'}")
    other.save_trace(trace)
    assert other.load_trace(trace.run_id) == trace


def test_list_filter_delete(store, tiny):
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


def test_writes_are_batched(store, tiny, monkeypatch):
    calls = []
    original = store.append_events
    monkeypatch.setattr(store, "append_events", lambda *a, **k: (calls.append(len(a[2])), original(*a, **k)))
    run_to_end(tiny, RunRequest.build("greedy", {}, "batch", max_new_tokens=20), recorder=Recorder(store, 8))
    assert calls == [8, 8, 4]


def test_a_running_run_is_visible_with_its_steps_so_far(store, tiny):
    recorder = Recorder(store, batch_size=4)
    events = run_strategy(tiny, RunRequest.build("greedy", {}, "abc", max_new_tokens=30), recorder=recorder)
    for event in events:
        if isinstance(event, TokenStep) and event.step == 9:
            break
    partial = store.load_trace(recorder.trace.run_id)  # a reader while the run is still open
    assert partial.status == "running" and len(partial.token_steps) == 8
    events.close()


def test_schema_version_mismatch_is_refused(tmp_path):
    path = tmp_path / "db.sqlite"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(ValueError, match="schema version 999"):
        Store(f"sqlite:///{path}")


def test_sqlite_uses_wal(store):
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
