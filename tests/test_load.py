"""Many users at once (bounded, loopback only): 8 gradio_client sessions each run a short decode through the real
app at the same moment; all finish, each gets its own run, no events are mixed between runs, and the database
passes SQLite's integrity check. benchmarks/bench_load.py prints the timings."""

import os

import pytest

from benchmarks.bench_load import check_runs, run_sessions
from explorer.testing import running_app


@pytest.mark.browser
def test_eight_sessions_at_once_each_get_their_own_run(tiny_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'load.sqlite'}"
    env = {**os.environ, "DECODING_EXPLORER_MODEL": str(tiny_dir), "DECODING_EXPLORER_DB": db,
           "DECODING_EXPLORER_CONCURRENCY": "4"}
    with running_app(env, tmp_path / "app.log") as url:
        sessions, _ = run_sessions(url, 8, 16)
    assert check_runs(sessions, db) == []
    assert all(s.first_token_s is not None and s.first_token_s <= s.total_s for s in sessions)
