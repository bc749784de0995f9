"""Many users at once (bounded, loopback only): 8 gradio_client sessions each run a short decode through the real
app at the same moment; all finish, each gets its own run, no events are mixed between runs, and the database
passes SQLite's integrity check. benchmarks/bench_load.py prints the timings."""

import os

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from benchmarks.bench_load import check_runs, run_sessions
from explorer.testing import running_app
from tests.test_app import open_page, set_number


@pytest.mark.browser
def test_eight_sessions_at_once_each_get_their_own_run(tiny_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'load.sqlite'}"
    env = {**os.environ, "DECODING_EXPLORER_MODEL": str(tiny_dir), "DECODING_EXPLORER_DB": db,
           "DECODING_EXPLORER_CONCURRENCY": "4"}
    with running_app(env, tmp_path / "app.log") as url:
        sessions, _ = run_sessions(url, 8, 16)
    assert check_runs(sessions, db) == []
    assert all(s.first_token_s is not None and s.first_token_s <= s.total_s for s in sessions)


@pytest.mark.browser
def test_browser_a_waiting_visitor_sees_the_queue_position(tiny_dir, tmp_path, browser):
    """With one run decoding at a time (the default), a second visitor's Run waits in Gradio's queue and the
    page says so; the first visitor's Stop lets it through. (An app of its own: nobody else's runs queue.)"""
    env = {**os.environ, "DECODING_EXPLORER_MODEL": str(tiny_dir), "DECODING_EXPLORER_DB":
           f"sqlite:///{tmp_path / 'queue.sqlite'}", "DECODING_EXPLORER_MAX_NEW_TOKENS": "2000"}
    with running_app(env, tmp_path / "app.log") as url:
        wait_in_the_queue(browser, url)


def wait_in_the_queue(browser, url: str) -> None:
    busy = open_page(browser, url, "Tell me a long story", strategies={1: "cautious", 2: "greedy"})
    lane = busy.locator("#lane1")
    lane.get_by_text("parameters", exact=True).click()
    for label, value in (("h_min", "0"), ("h_max", "0.01"), ("n_max", "8"), ("max_trial_tokens", "64")):
        set_number(lane, label, value)
    set_number(busy, "max new tokens", "2000")
    waiting = open_page(browser, url, "Me next")  # ready before the busy run starts: no time lost in between
    busy.locator("#run").click()
    busy.wait_for_function("document.querySelector('#run').disabled", timeout=30_000)  # it holds the slot
    waiting.locator("#run").click()
    waiting.wait_for_function("document.body.innerText.includes('queue')", timeout=30_000)
    assert "queue: 1/1" in waiting.locator("body").inner_text()
    try:
        busy.locator("#stop").click(timeout=5_000)
    except PlaywrightTimeout:  # the busy run ended by itself (EOS) in the meantime: Stop is off again
        pass
    waiting.wait_for_selector("#permalink a", timeout=120_000)  # its turn came
