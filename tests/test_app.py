"""The app: builds without weights, answers gradio_client, and works in a real headless Chromium."""

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import REGISTRY
from explorer.testing import running_app
from explorer.ui.compare import NO_PAIR
from store import Store
from tests.test_viz import hostile_trace

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "plugins" / "top_nsigma.py"


def test_import_builds_blocks_without_loading_weights():
    import app

    assert app.demo is not None and app.MODELS._models == {}
    assert len(app.demo.blocks) < 400  # a lane draws one strategy's controls, not every strategy's (2165 before)


def test_every_strategy_but_greedy_draws_its_controls_with_the_values_chosen():
    import gradio as gr

    from explorer.ui import compare

    with gr.Blocks():
        drawn = {name: compare.strategy_controls(REGISTRY[name].config) for name in compare.strategy_names()}
        chosen = compare.strategy_controls(REGISTRY["speculative"].config, {"draft_length": 7, "rule": "sampling"})
    assert {name for name, controls in drawn.items() if controls} == set(compare.strategy_names()) - {"greedy"}
    assert set(drawn["mirostat"]) == {"tau", "eta", "temperature", "version"}
    assert chosen["draft_length"].value == 7
    assert chosen["temperature"].interactive  # the sampling rule enables the filters
    assert not drawn["speculative"]["temperature"].interactive  # greedy rule (the default): off


def test_lane_specs_come_from_the_lane_state():
    import app
    from explorer.ui.compare import remember

    first, second = app.PAGE.lanes[:2]
    set_top_p = remember("sample", "top_p")
    chosen = remember("mirostat", "tau")(set_top_p({}, 0.5), 4.0)  # two controls changed, in two strategies
    values = {first.strategy: "sample", first.chosen: chosen, second.strategy: "mirostat", second.chosen: None}
    assert first.params(values) == ("sample", {"top_p": 0.5})  # the other strategy's values stay aside
    assert second.params(values) == ("mirostat", {})  # nothing set: the config's defaults
    restored = first.restored("sample", {"top_p": 0.25, "not_a_field": 1})
    assert restored[first.chosen] == {"sample": {"top_p": 0.25}} and restored[first.redraw] > 0
    # a run of a strategy this server lacks (a recorded generate call, a plugin not loaded) opens as stored
    # (the controls stay as they are; the lane's about line says what it shows)
    foreign = first.restored("transformers.generate", {"do_sample": False})
    assert list(foreign) == [first.about] and "does not have" in foreign[first.about]
    imported = first.restored("external", {}, {"external": "vllm", "method": "eagle3", "source": "r.jsonl"})
    assert "Imported from vllm" in imported[first.about] and "eagle3" in imported[first.about]


def test_every_handler_writes_only_what_its_event_lists(tiny, monkeypatch):
    """The events' output lists are derived from the Page: each handler's keys are among them (Gradio refuses a
    key that is not an output of the event)."""
    import app
    from explorer.serving import Viewer
    from explorer.ui import compare

    page = app.PAGE
    traces = [run_to_end(tiny, RunRequest.build(name, {}, "Hi", max_new_tokens=3)) for name in ("greedy", "sample")]
    monkeypatch.setattr(compare, "render_views", lambda traces, view_lane, viewer=None: [None] * len(compare.VIEWS))
    finished = {**page.render_lanes(traces, "probability"), **page.views_of(traces, "1", Viewer("o")),
                **page.render_summary(traces), page.traces: traces, page.link: ""}
    assert set(finished) <= set(page.run_outputs)
    assert set(page.show_lanes(3, "1")) <= set(page.lane_controls)
    opened = page.opened(traces, "probability", "1", Viewer("o"))
    assert set(opened) <= set(page.opened_outputs)
    foreign = dataclasses.replace(traces[0].started, strategy="transformers.generate")
    recorded = dataclasses.replace(traces[0], started=foreign)
    assert page.opened([recorded], "probability", "1", Viewer("o"))[page.traces] == [recorded]
    assert set(page.lanes[0].restored("sample", {"top_p": 0.5})) <= set(page.opened_outputs)
    assert set(page.run_outputs) <= set(page.branch_outputs) and set(page.lane_controls) <= set(page.branch_outputs)


def test_render_views_fills_every_tab(tiny_flat):
    from explorer.ui import compare

    traces = [run_to_end(tiny_flat, RunRequest.build(name, {}, "Hi", max_new_tokens=6))
              for name in ("beam", "prompt_lookup", "jacobi", "momentum")]
    figures = compare.render_views(traces, "1")
    assert len(figures) == len(compare.VIEWS) == len(compare.VIEW_NAMES)
    assert figures[compare.BEAM_VIEW].layout.title.text.startswith("Beam tree")
    shown = dict(zip(compare.VIEW_NAMES, compare.render_views(traces, "2"), strict=True))
    assert "— 2: prompt_lookup" in shown["heatmap"].layout.title.text  # the lane shown, not always "1:"
    assert "— 2: prompt_lookup" in shown["acceptance"].layout.title.text
    assert "— 3: jacobi" in shown["jacobi-grid"].layout.title.text  # the first lane the view applies to
    assert "— 4: momentum" in shown["momentum"].layout.title.text
    assert "— 1: beam" in shown["beam-tree"].layout.title.text


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_draft_dir, tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('appdb') / 'runs.sqlite'}"
    # DECODING_EXPLORER_TEST_MODEL=embedded (with DECODING_EXPLORER_SCREENSHOT=assets/screenshot.png) makes the
    # README's screenshot on the real model; by default the tests use the tiny random model.
    model = os.environ.get("DECODING_EXPLORER_TEST_MODEL", str(tiny_dir))
    env = {**os.environ, "DECODING_EXPLORER_MODEL": model, "DECODING_EXPLORER_DB": db,
           "DECODING_EXPLORER_MAX_NEW_TOKENS": "2000", "DECODING_EXPLORER_PUBLIC_GALLERY": "0",
           "DECODING_EXPLORER_PAIRS": f"tiny pair={model}+{tiny_draft_dir}",
           "DECODING_EXPLORER_ALLOWED_MODELS": f"embedded,{model},{tiny_draft_dir}",
           "DECODING_EXPLORER_PLUGINS": str(PLUGIN)}  # the server's owner loads a plugin (README, "Your own method")
    with running_app(env, tmp_path_factory.mktemp("applog") / "app.log") as url:
        yield url, db


def test_gradio_client_generate(server):
    from gradio_client import Client

    url, db = server
    client = Client(url, verbose=False)
    result = client.predict("Hello there", "sample", '{"top_p": 0.9}', "", 4, 12, True, api_name="/generate")
    assert isinstance(result["text"], str) and len(result["token_ids"]) == 12
    stored = Store(db).load_trace(result["run_id"])
    assert stored.token_ids == result["token_ids"] and stored.started.config["top_p"] == 0.9
    with pytest.raises(Exception, match="top_p must be in"):
        client.predict("Hello", "sample", '{"top_p": 2}', "", 0, 5, True, api_name="/generate")


def test_gradio_client_branch(server):
    from gradio_client import Client

    url, db = server
    client = Client(url, verbose=False)
    parent = client.predict("What if", "greedy", "{}", "", 0, 10, True, api_name="/generate")
    stored = Store(db).load_trace(parent["run_id"])
    alternative = stored.token_steps[5].top_ids[1]
    branch = client.predict(parent["run_id"], 5, str(alternative), "", "{}", "", api_name="/branch")
    assert branch["parent_run"] == parent["run_id"] and branch["parent_step"] == 5
    assert branch["token_ids"][:5] == parent["token_ids"][:5] and branch["token_ids"][5] == alternative
    other = client.predict(parent["run_id"], 2, str(stored.token_steps[2].top_ids[1]), "sample", '{"top_p": 0.5}',
                           "", api_name="/branch")
    assert Store(db).load_trace(other["run_id"]).started.strategy == "sample"
    with pytest.raises(Exception, match="step must be between 0 and 9"):
        client.predict(parent["run_id"], 10, "a", "", "{}", "", api_name="/branch")
    with pytest.raises(Exception, match="among the runs you can see|no run with id"):
        Client(url, verbose=False).predict("0123456789ab", 1, "a", "", "{}", "", api_name="/branch")


def test_two_sessions_cannot_reach_each_others_runs(server):
    from gradio_client import Client

    url, db = server
    alice, mallory = Client(url, verbose=False), Client(url, verbose=False)
    secret = alice.predict("alice's private prompt", "greedy", "{}", "", 0, 4, True, api_name="/generate")["run_id"]
    listed = mallory.predict("(any)", "", "", api_name="/history_rows")
    assert secret not in json.dumps(listed) and "private prompt" not in json.dumps(listed)
    assert secret in json.dumps(alice.predict("(any)", "", "", api_name="/history_rows"))
    with pytest.raises(Exception, match="among the runs you can see"):
        mallory.predict(secret, "JSONL", api_name="/export_runs")
    mallory.predict(secret, "(any)", "", "", api_name="/delete_runs")
    assert Store(db).load_trace(secret).run_id == secret  # still there
    assert alice.predict(secret, "JSONL", api_name="/export_runs")
    with pytest.raises(Exception, match="does not load that model"):
        mallory.predict("hi", "greedy", "{}", "/etc", 0, 4, True, api_name="/generate")
    with pytest.raises(Exception, match="does not load that model"):
        mallory.predict("hi", "speculative", '{"draft_model": "/no/such/dir"}', "", 0, 4, True, api_name="/generate")


def test_a_cancelled_api_call_stops_computing(server):
    """A client that cancels (or drops) its /generate call is no longer served: its run stops at the next step
    and is stored as cancelled, not left computing until its time budget."""
    from gradio_client import Client

    url, db = server
    client = Client(url, verbose=False)
    params = json.dumps({"h_min": 0, "h_max": 0.01, "n_max": 8, "max_trial_tokens": 64})
    job = client.submit("Tell me a long story", "cautious", params, "", 0, 2000, True, api_name="/generate")
    deadline = time.time() + 60
    run_id = None
    while run_id is None and time.time() < deadline:
        outputs = job.outputs()
        run_id = outputs[-1]["run_id"] if outputs else None
        time.sleep(0.1)
    assert run_id is not None
    job.cancel()
    deadline = time.time() + 30
    while time.time() < deadline and Store(db).load_trace(run_id).status == "running":
        time.sleep(0.5)
    stored = Store(db).load_trace(run_id)
    assert stored.status == "cancelled" and len(stored.token_steps) < 2000


def test_bounded_load_of_the_worst_allowed_requests(server):
    """A few sessions at once, each asking for the largest allowed tree: all finish, each gets its own run, and
    the database stays sound."""
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    url, db = server
    params = json.dumps({"branching": 2, "depth": 6})

    def one(index: int) -> dict:
        client = Client(url, verbose=False)
        return client.predict(f"session {index}", "tree_speculative", params, "", index, 24, True,
                              api_name="/generate")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert len({r["run_id"] for r in results}) == 4
    for result in results:
        stored = Store(db).load_trace(result["run_id"])
        assert stored.status == "ok" and stored.token_ids == result["token_ids"]
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def open_page(browser, url: str, prompt: str | None = None, strategies: dict[int, str] | None = None,
              width: int = 1400):
    """A fresh page on the app, with the prompt typed and lane strategies chosen."""
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.goto(url)
    if prompt is not None:
        page.locator("#prompt textarea").fill(prompt)
    for lane, name in (strategies or {}).items():
        choose_strategy(page, lane, name)
    return page


def permalink_runs(page, db: str) -> list:
    """The stored runs of the permalink the page shows."""
    run_ids = page.locator("#permalink a").get_attribute("href").split("=", 1)[1].split(",")
    return Store(db).load_traces(run_ids)


@pytest.mark.browser
def test_browser_two_lanes_heatmap_and_permalink(server, browser, tmp_path):
    url, db = server
    page = open_page(browser, url, "Once upon a time")
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)  # appears when every lane has finished
    for lane in (1, 2):
        assert page.locator(f"#lane{lane}-output .tok").count() > 0
        assert "tokens/s" in page.locator(f"#lane{lane}-metrics").inner_text()
    page.wait_for_selector("#heatmap .js-plotly-plot", timeout=30_000)
    link = page.locator("#permalink a").get_attribute("href")
    assert link.startswith("?compare=") and len(link.split("=", 1)[1].split(",")) == 2
    run_ids = link.split("=", 1)[1].split(",")
    stored = Store(db).load_traces(run_ids)
    assert [t.started.strategy for t in stored] == ["greedy", "sample"]
    assert page.locator("#lane1-output .tok").count() == len(stored[0].token_ids)
    first = page.locator("#lane1-output .tok").first
    first.click()  # a popover, not the browser's tooltip: it opens on click and stays while focused
    popover = first.locator(".pop")
    popover.wait_for(state="visible", timeout=10_000)
    assert popover.locator(".bar-row").count() == 10 and popover.locator(".bar-row.chosen").count() == 1
    assert "entropy" in popover.inner_text() and "rank" in popover.inner_text()
    page.locator("#prompt textarea").click()
    popover.wait_for(state="hidden", timeout=10_000)
    assert "speedup" not in page.locator("#lane2-metrics").inner_text()  # sampling vs greedy: not a speed-up
    assert page.locator("#lane-summary tbody tr").count() == 2
    page.get_by_role("radio", name="2", exact=True).check()
    page.wait_for_function("document.querySelector('#heatmap') && "
                           "document.querySelector('#heatmap').textContent.includes('2: sample')", timeout=30_000)
    shot = Path(os.environ.get("DECODING_EXPLORER_SCREENSHOT", tmp_path / "app.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    permalink = browser.new_page(viewport={"width": 1400, "height": 1000})
    permalink.goto(url + link)
    permalink.wait_for_function(
        "document.querySelector('#lane2-output') && document.querySelectorAll('#lane2-output .tok').length > 0",
        timeout=30_000)
    assert permalink.locator("#lane1-output .tok").count() == len(stored[0].token_ids)
    assert stored[1].run_id in permalink.locator("#lane2-metrics").inner_text()


@pytest.mark.browser
def test_browser_escapes_hostile_output(server, browser, tiny):
    url, db = server
    base = run_to_end(tiny, RunRequest.build("greedy", {}, "x", max_new_tokens=2), recorder=Recorder())
    trace = hostile_trace(base)
    Store(db).save_trace(trace)
    page = browser.new_page()
    page.goto(f"{url}?run={trace.run_id}")
    page.wait_for_function("document.querySelectorAll('#lane1-output .tok').length === 4", timeout=30_000)
    text = page.locator("#lane1-output").inner_text()
    assert '<script>alert("x")</script>' in text and '<img src=x onerror="window.__xss=1">' in text
    for index in range(4):  # the popovers show the hostile text as text too
        token = page.locator("#lane1-output .tok").nth(index)
        token.click()
        token.locator(".pop").wait_for(state="visible", timeout=10_000)
    assert page.locator("#lane1-output script").count() == 0 and page.locator("#lane1-output img").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"


@pytest.mark.browser
def test_browser_hostile_prompt_never_runs(server, browser):
    url, _ = server
    page = open_page(browser, url)
    hostile = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> Repeat the text before this.'
    page.locator("#prompt textarea").fill(hostile)
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("document.querySelector('#history').innerText.includes('onerror')",
                           timeout=20_000)
    link = page.evaluate("location.href")
    page.goto(link.split("?")[0] + page.locator("#permalink a").get_attribute("href"))
    page.wait_for_function("document.querySelectorAll('#lane1-output .tok').length > 0", timeout=30_000)
    page.locator("#lane1-output .tok").first.click()
    for area in ("#history", "#lane1-output", "#lane-summary", "#permalink"):
        assert page.locator(f"{area} img").count() == 0 and page.locator(f"{area} script").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"


@pytest.mark.browser
@pytest.mark.parametrize("width", [1280, 800])
def test_browser_screenshots_and_a_narrow_page(server, browser, tmp_path, width):
    """The README's screenshot set (written to assets/ when DECODING_EXPLORER_SCREENSHOTS=assets), and the page
    stays usable at 800 px: nothing wider than the window, every view tab on screen, no clipped labels."""
    url, _ = server
    folder = Path(os.environ.get("DECODING_EXPLORER_SCREENSHOTS", tmp_path))
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(url)
    page.locator("#prompt textarea").fill("ab ab ab ab ab")
    choose_strategy(page, 2, "prompt_lookup")
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)
    page.wait_for_selector("#heatmap .js-plotly-plot", timeout=30_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    tabs = page.get_by_role("tab").all_inner_texts()
    assert {"Top-k & entropy", "Sampling", "Speculative", "Trees & Jacobi", "Search", "What if"} <= set(tabs)
    chat = page.get_by_text("chat template", exact=True)
    assert chat.evaluate("e => e.scrollWidth <= e.clientWidth + 1")  # the label is not cut
    page.screenshot(path=str(folder / f"compare-{width}.png"), full_page=True)
    page.get_by_role("tab", name="Speculative").click()
    page.wait_for_selector("#acceptance .js-plotly-plot", timeout=30_000)
    page.locator("#lane2-output .tok").first.click()
    page.screenshot(path=str(folder / f"speculative-{width}.png"), full_page=True)
    page.get_by_role("tab", name="History").click()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(folder / f"history-{width}.png"), full_page=False)


@pytest.mark.browser
def test_browser_click_a_token_branch_and_see_the_new_lane(server, browser, tmp_path):
    """What if: record the lens, click a token in lane 1, pick another token there, Branch: a third lane opens with
    the parent's tokens up to that step, the forced token, and the branch tree and logit lens views draw."""
    url, db = server
    folder = Path(os.environ.get("DECODING_EXPLORER_SCREENSHOTS", tmp_path))
    page = open_page(browser, url, "Once upon a time")
    page.get_by_text("Look inside: logit lens and attention", exact=False).click()
    page.get_by_label("record logit lens").check()
    page.get_by_label("record attention").check()
    set_number(page, "max new tokens", "12")
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)
    parent = permalink_runs(page, db)[0]
    assert parent.started.probes["lens"] and any(e.kind == "lens_step" for e in parent.events)
    assert any(e.kind == "attention_step" for e in parent.events)
    page.get_by_text("What if: click a token", exact=False).click()
    page.locator("#lane1-output .tok").nth(4).click()
    page.wait_for_function("document.querySelector('#branch-step input').value === '4'", timeout=30_000)
    assert page.locator("#branch-lane input").input_value() == "1"
    page.locator("#branch").click()
    page.wait_for_selector("#lane3-output .tok", timeout=60_000)
    page.wait_for_function("document.querySelector('#permalink a') && "
                           "document.querySelector('#permalink a').href.split(',').length === 3", timeout=60_000)
    branch = permalink_runs(page, db)[2]
    assert branch.started.parent_run == parent.run_id and branch.started.parent_step == 4
    assert branch.token_ids[:4] == parent.token_ids[:4] and branch.token_ids[4] != parent.token_ids[4]
    assert branch.token_steps[4].origin == "forced"
    assert page.locator("#lane3-output .tok").count() == len(branch.token_ids)
    page.get_by_role("tab", name="What if").click()
    for view in ("logit-lens", "attention-graph", "branch-tree"):
        page.wait_for_selector(f"#{view} .js-plotly-plot", timeout=30_000)
    assert "forced" in page.locator("#branch-tree").inner_text() or page.locator("#branch-tree .point").count()
    page.screenshot(path=str(folder / "what-if-1280.png"), full_page=True)


@pytest.mark.browser
def test_browser_diffusion_lanes_draw_their_unmasking_order(server, browser, tmp_path):
    """A diffusion lane and a Prophet lane on the (causal) model: both decode, and the Diffusion tab draws the
    unmasking order, the canvas replay and the tokens per step."""
    url, db = server
    folder = Path(os.environ.get("DECODING_EXPLORER_SCREENSHOTS", tmp_path))
    page = open_page(browser, url, "Once upon a time", strategies={1: "diffusion", 2: "prophet"})
    set_number(page, "max new tokens", "24")
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=90_000)
    stored = permalink_runs(page, db)
    assert [t.started.strategy for t in stored] == ["diffusion", "prophet"]
    assert all(t.status == "ok" and any(e.kind == "unmask_step" for e in t.events) for t in stored)
    assert page.locator("#lane1-output .tok").count() == len(stored[0].token_ids)
    page.get_by_role("tab", name="Diffusion").click()
    for view in ("unmasking-order", "unmasking-replay", "unmasking-commits"):
        page.wait_for_selector(f"#{view} .js-plotly-plot", timeout=30_000)
    assert "Unmasking order" in page.locator("#unmasking-order").inner_text()
    page.screenshot(path=str(folder / "diffusion-1280.png"), full_page=True)


@pytest.mark.browser
def test_browser_bad_input_shows_a_message_not_a_trace(server, browser):
    url, _ = server
    page = browser.new_page()
    page.goto(url)
    page.locator("#prompt textarea").fill("   ")
    page.locator("#run").click()
    page.wait_for_selector("text=the prompt is empty", timeout=30_000)
    assert "Traceback" not in page.content()
    page.wait_for_timeout(500)
    assert page.locator("[data-testid='status-tracker'] .error").count() == 0  # one toast, no red badges


@pytest.mark.browser
def test_browser_lane_buttons_never_break_the_page(server, browser):
    url, _ = server
    page = open_page(browser, url)
    baseline = page.get_by_role("button", name="+ greedy baseline")
    page.get_by_role("button", name="+ lane").click()
    baseline.click()
    page.wait_for_function("document.querySelector('#lane4-strategy input') && "
                           "document.querySelector('#lane4-strategy input').value === 'greedy · sampling'",
                           timeout=30_000)
    assert baseline.is_disabled() and page.get_by_role("button", name="+ lane").is_disabled()
    assert page.locator("#view-lane input[type=radio]").count() == 4  # the per-lane views offer open lanes only
    baseline.click(force=True)  # a click that lands anyway changes nothing and breaks nothing
    page.wait_for_timeout(800)
    assert page.locator("[data-testid='status-tracker'] .error").count() == 0
    assert all(page.locator(f"#lane{lane}-strategy input").is_visible() for lane in range(1, 5))
    page.get_by_role("button", name="− lane").click()
    page.wait_for_function("!document.querySelector('#lane4-output') || "
                           "document.querySelector('#lane4-output').offsetParent === null", timeout=30_000)
    assert not baseline.is_disabled()
    assert page.locator("#view-lane input[type=radio]").count() == 3


def strategy_label(name: str) -> str:
    from explorer.strategies import REGISTRY

    return f"{name} · {REGISTRY[name].family}"


def choose_strategy(page, lane: int, name: str) -> None:
    box = page.locator(f"#lane{lane}-strategy input")
    box.click()
    page.locator(f"#lane{lane}-strategy").get_by_role("option", name=strategy_label(name), exact=True).click()
    page.wait_for_function(f"document.querySelector('#lane{lane}-strategy input').value === '{strategy_label(name)}'")
    from explorer.strategies import REGISTRY

    summary = REGISTRY[name].summary[:30].replace("'", "\\'")  # the lane has switched to its controls
    page.wait_for_function(f"document.querySelector('#lane{lane}-about').textContent.includes('{summary}')",
                           timeout=20_000)


@pytest.mark.browser
def test_browser_a_plugin_strategy_runs_in_a_lane_and_draws_its_own_view(server, browser):
    """The server loaded examples/plugins/top_nsigma.py (DECODING_EXPLORER_PLUGINS), a file nothing in the app
    imports: its strategy is listed under plugins, runs in a lane, is stored, and its own view draws."""
    url, db = server
    page = open_page(browser, url, "Once upon a time")
    page.locator("#lane1-strategy input").click()
    page.locator("#lane1-strategy").get_by_role("option", name="top_nsigma · plugins", exact=True).click()
    page.wait_for_function("document.querySelector('#lane1-about').textContent.includes('keep the tokens within')",
                           timeout=20_000)
    set_number(page, "max new tokens", "12")
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=90_000)
    stored = permalink_runs(page, db)
    assert stored[0].started.strategy == "top_nsigma" and stored[0].status == "ok" and stored[0].token_ids
    page.get_by_role("tab", name="Sampling").click()
    page.wait_for_selector("#top-nsigma .js-plotly-plot", timeout=30_000)


@pytest.mark.browser
def test_browser_strategy_choice_is_explained_and_filters_follow_the_rule(server, browser):
    url, _ = server
    page = open_page(browser, url)
    page.locator("#lane1-strategy input").click()
    options = [text.replace("✓", "").strip() for text in page.get_by_role("option").all_inner_texts()]
    assert options[0] == "greedy · sampling" and "speculative · speed-up: draft-verify" in options
    page.get_by_role("option", name=strategy_label("speculative"), exact=True).click()
    page.wait_for_function("document.querySelector('#lane1-about').textContent.includes('arXiv:2211.17192')")
    entry = page.locator("#lane1-about details")  # the fidelity status opens the strategy's ledger entry
    assert not entry.get_by_text("Authors' code", exact=True).is_visible()
    entry.locator("summary").click()
    entry.get_by_text("Authors' code", exact=True).wait_for(state="visible", timeout=10_000)
    lane = page.locator("#lane1")
    lane.get_by_text("parameters", exact=True).click()
    lane.get_by_text("sampling rule: filters applied to p and q", exact=False).click()
    temperature = lane.locator("input[aria-label='number input for temperature']")
    assert temperature.is_disabled()  # greedy rule: the filters do nothing, so they are off
    rule = lane.get_by_label("rule", exact=True).first
    rule.click()
    page.get_by_role("option", name="sampling", exact=True).click()
    page.wait_for_function("() => !document.querySelector(\"#lane1 input[aria-label='number input for "
                           "temperature']\").disabled", timeout=10_000)


def test_a_lane_description_carries_its_fidelity_status():
    from explorer.ui.compare import strategy_about

    eagle = strategy_about("eagle")
    assert f"<summary>fidelity: {len(REGISTRY['eagle'].departures)} departures (its ledger entry)</summary>" in eagle
    assert all(departure in eagle for departure in REGISTRY["eagle"].departures)  # the entry opens in place
    assert "SafeAILab/EAGLE" in eagle and "arXiv:2401.15077" in eagle
    assert "fidelity: faithful" in strategy_about("greedy")


def draft_model_box(page, lane: int):
    """The draft_model text box of a lane, its parameters opened."""
    page.locator(f"#lane{lane}").get_by_text("parameters", exact=True).click()
    return page.locator(f"#lane{lane}").locator("label", has_text="draft_model").locator("textarea").first


def set_number(lane_box, label: str, value: str) -> None:
    """Type a number into a slider's box and check that it took (a box typed into while the page is still
    settling, e.g. just after its accordion opened, may snap back to its old value: then type it again)."""
    box = lane_box.locator(f"input[aria-label='number input for {label}']")
    for attempt in range(4):
        box.fill(value)
        box.press("Enter")
        try:
            box.page.wait_for_function("([box, want]) => Number(box.value) === Number(want)",
                                       arg=[box.element_handle(), value], timeout=1_000 * (attempt + 1))
            box.page.wait_for_timeout(200)
            if float(box.input_value()) == float(value):
                return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try again
            pass
    raise AssertionError(f"the box {label} would not take {value} (it shows {box.input_value()})")


@pytest.mark.browser
def test_browser_target_and_draft_preset_sets_the_model_and_every_draft(server, browser, tiny_draft_dir):
    url, db = server
    page = open_page(browser, url, "Once upon a time", strategies={1: "speculative", 2: "tree_speculative"})
    box = ("([lane, want]) => [...document.querySelectorAll(`#lane${lane} label`)].some("
           "l => l.textContent.includes('draft_model') && l.querySelector('textarea') && "
           "(want === null || l.querySelector('textarea').value === want))")
    for lane in (1, 2):  # the strategy's controls drawn (a late redraw from choosing it would draw over the preset)
        page.locator(f"#lane{lane}").get_by_text("parameters", exact=True).click()
        try:
            page.wait_for_function(box, arg=[lane, None], timeout=15_000)
        except PlaywrightTimeout:
            pass  # closed again by a late redraw: the loop below opens it

    def choose(name: str) -> None:
        page.locator("#pair input").click()
        page.locator("#pair").get_by_role("option", name=name, exact=True).click()
        page.wait_for_function(f"document.querySelector('#pair input').value === '{name}'")

    choose("tiny pair")
    # a redraw draws the parameters closed (open them again while the box is missing), and on a loaded machine a
    # redraw from choosing the strategy can land after the preset's: choosing the preset again redraws
    start = last_choice = time.time()
    while not all(page.evaluate(box, [lane, str(tiny_draft_dir)]) for lane in (1, 2)):
        assert time.time() < start + 60, "the lanes never showed the preset's draft model"
        for lane in (1, 2):
            if not page.evaluate(box, [lane, None]):
                page.locator(f"#lane{lane}").get_by_text("parameters", exact=True).click()
        if time.time() > last_choice + 15:
            choose(NO_PAIR)
            choose("tiny pair")
            last_choice = time.time()
        page.wait_for_timeout(500)
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)
    stored = permalink_runs(page, db)
    assert [t.started.config["draft_model"] for t in stored] == [str(tiny_draft_dir)] * 2
    assert all(t.token_ids for t in stored), [(t.status, t.finished.error if t.finished else None) for t in stored]


@pytest.mark.browser
def test_browser_live_progress_stop_and_summary(server, browser):
    url, db = server
    page = open_page(browser, url, "Tell me a long story", strategies={1: "cautious", 2: "prompt_lookup"})
    lane = page.locator("#lane1")
    lane.get_by_text("parameters", exact=True).click()
    for label, value in (("h_min", "0"), ("h_max", "0.01"), ("n_max", "8"), ("max_trial_tokens", "64")):
        set_number(lane, label, value)  # every step branches into 8 trials: slow enough to stop by hand
    set_number(page, "max new tokens", "2000")  # far more than it reaches before Stop
    page.locator("#run").click()
    page.wait_for_function("document.querySelector('#lane1-metrics').innerText.includes('step')", timeout=60_000)
    assert page.locator("#run").is_disabled() and not page.locator("#stop").is_disabled()
    page.wait_for_function("() => { const t = document.querySelector('#lane1-metrics').innerText; "
                           "return /forward passes\\s*[1-9]/.test(t) && !/tokens\\/s\\s*–/.test(t); }",
                           timeout=60_000)  # live numbers while the run streams
    try:  # on a loaded 2-core machine the model's threads starve the browser: scrolling to Stop can take long
        page.locator("#stop").click(timeout=60_000)
    except PlaywrightTimeout:  # the lanes ended (EOS) between the last check and the click: allowed below
        assert page.locator("#stop").is_disabled()
    page.wait_for_function("!document.querySelector('#run').disabled", timeout=90_000)  # the run is over
    page.wait_for_selector("#permalink a", timeout=30_000)
    assert not page.locator("#run").is_disabled() and page.locator("#stop").is_disabled()
    stored = permalink_runs(page, db)
    # A lane still running when Stop lands is stored as cancelled and says so; on a loaded machine the tiny
    # model may finish a lane first (EOS or the limit), which is then stored as it ended. Either way the lane
    # shows exactly what the database holds.
    assert any(t.status == "cancelled" for t in stored) or all(t.status == "ok" for t in stored)
    for lane, trace in enumerate(stored, start=1):
        assert trace.status in ("cancelled", "ok")
        assert page.locator(f"#lane{lane}-output .tok").count() == len(trace.token_ids)  # lane and store agree
        if trace.status == "cancelled":
            status = page.locator(f"#lane{lane}-output .run-status").inner_text()
            assert status == f"cancelled at step {len(trace.token_ids)}: cancelled by the user"
    assert page.locator("#lane-summary tbody tr").count() == 2
    rows = page.locator("#lane-summary tbody tr")
    assert rows.nth(0).locator("td").nth(3).inner_text() == "–"  # no speedup for cautious (or a stopped run)


@pytest.mark.browser
def test_browser_speculative_defaults_to_a_real_drafter_and_warns_about_the_target(server, browser):
    url, db = server
    page = open_page(browser, url, "Once upon a time", strategies={1: "speculative", 2: "speculative"})
    box = draft_model_box(page, 2)
    for _ in range(10):  # a re-render right after the strategy change can reset the box: type until it sticks
        box.fill("target")
        box.press("Tab")
        page.wait_for_timeout(500)
        if box.input_value() == "target":
            break
    assert box.input_value() == "target"
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)
    assert "the draft is the target itself" in page.locator("#lane2-metrics").inner_text()
    assert "the draft is the target itself" not in page.locator("#lane1-metrics").inner_text()
    default, itself = permalink_runs(page, db)
    # 'auto': no EAGLE head ships for the tiny test model, so the layer-skip draft drafts
    assert default.started.config["draft_model"] == "auto" and "skipping" in default.rounds[0].drafter
    assert itself.started.config["draft_model"] == "target"


@pytest.mark.browser
def test_browser_history_filters_live_restores_inputs_and_confirms_deletes(server, browser):
    url, db = server
    page = open_page(browser, url, "remember this prompt")
    set_number(page, "max new tokens", "17")
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)
    run_ids = page.locator("#permalink a").get_attribute("href").split("=", 1)[1]
    page.get_by_role("tab", name="History").click()
    search = page.get_by_label("prompt or output contains")
    search.fill("remember this")
    page.wait_for_function("document.querySelector('#history').innerText.includes('remember this prompt')",
                           timeout=20_000)
    search.fill("no run says this")  # no Refresh, no Enter: the list follows the filter
    page.wait_for_function("!document.querySelector('#history').innerText.includes('remember this prompt')",
                           timeout=20_000)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#prompt textarea").fill("something else")
    set_number(page, "max new tokens", "30")
    page.get_by_role("tab", name="History").click()
    page.locator("#run-ids textarea").fill(run_ids)
    page.get_by_role("button", name="Open side by side").click()
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'remember this prompt'",
                           timeout=20_000)  # opening restores the inputs
    assert page.locator("input[aria-label='number input for max new tokens']").input_value() == "17"
    assert page.locator("#lane2-strategy input").input_value() == strategy_label("sample")
    page.get_by_role("tab", name="History").click()
    page.locator("#run-ids textarea").fill(run_ids.split(",")[0])
    page.get_by_role("button", name="Delete", exact=True).click()
    page.wait_for_selector("#confirm-delete", timeout=10_000)
    assert Store(db).load_trace(run_ids.split(",")[0])  # nothing deleted before the confirmation
    page.locator("#confirm-delete").click()
    page.wait_for_selector("text=deleted 1 run(s)", timeout=10_000)
    with pytest.raises(ValueError):
        Store(db).load_trace(run_ids.split(",")[0])
    bad = browser.new_page()
    bad.goto(url + "?run=0123456789ab")
    bad.wait_for_selector("text=the History tab lists the runs you can open", timeout=20_000)


@pytest.mark.browser
def test_browser_jacobi_grid_marks_only_committed_tokens(server, browser):
    url, db = server
    page = open_page(browser, url, "ab ab ab ab", strategies={1: "jacobi"})
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)
    page.get_by_role("tab", name="Trees & Jacobi").click()
    page.wait_for_function("() => { const p = document.querySelector('#jacobi-grid .js-plotly-plot'); "
                           "return p && p._fullData && p._fullData.some(t => t.name === 'converged'); }",
                           timeout=30_000)
    cells, diamonds = page.evaluate("""() => {
        const data = document.querySelector('#jacobi-grid .js-plotly-plot')._fullData;
        const list = a => Array.from(a);  // Plotly keeps numbers in typed arrays
        const cells = data.find(t => t.name === 'guess'), diamonds = data.find(t => t.name === 'converged');
        return [{x: list(cells.x), y: list(cells.y), color: list(cells.marker.color)},
                {x: list(diamonds.x), y: list(diamonds.y)}];
    }""")
    run_id = page.locator("#permalink a").get_attribute("href").split("=", 1)[1].split(",")[0]
    trace = Store(db).load_trace(run_id)
    from viz.speculative import ACCEPTED, jacobi_cells

    final = {(c.position, c.iteration): c.final for c in jacobi_cells(trace)[0]}
    at = {(x, y): color for x, y, color in zip(cells["x"], cells["y"], cells["color"], strict=True)}
    assert diamonds["x"]
    for x, y in zip(diamonds["x"], diamonds["y"], strict=True):  # each diamond sits on the committed token
        assert at[x, y] == ACCEPTED and final[x, y]


@pytest.mark.browser
def test_browser_beam_tree_and_draft_lanes(server, browser):
    url, db = server
    page = open_page(browser, url, "ab ab ab ab", strategies={1: "beam", 2: "prompt_lookup"})
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=60_000)
    page.get_by_role("tab", name="Search").click()
    page.wait_for_selector("#beam-tree .js-plotly-plot", timeout=30_000)
    stored = permalink_runs(page, db)
    assert [t.started.strategy for t in stored] == ["beam", "prompt_lookup"]
    assert page.locator("#lane1-output .tok").count() == len(stored[0].token_ids) > 0
    assert "speedup vs greedy" not in page.locator("#lane2-metrics").inner_text()  # no greedy lane to compare
    drafted = page.locator("#lane2-output .tok").nth(len(stored[1].token_ids) - 1)
    drafted.click()
    drafted.locator(".pop").wait_for(state="visible", timeout=10_000)
    if any(r.accepted_count for r in stored[1].rounds):  # p, q, u and the verdicts of the rounds there
        notes = "".join(page.locator("#lane2-output .pop").all_text_contents())
        assert "round" in notes and "q=" in notes


def test_the_branch_tree_draws_the_stored_branches_of_the_open_runs(tiny, tmp_path, monkeypatch):
    """The tree grows as a visitor explores: with only the parent open, its stored branches (this session's)
    are drawn too, grey; another session's branch of the same run is not."""
    from types import SimpleNamespace

    from explorer.branch import branch_request
    from explorer.ui import compare, context

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setattr(context, "_STORE", store)
    monkeypatch.setattr(context, "POLICY", dataclasses.replace(context.POLICY, public_gallery=False))
    me, stranger = (context.viewer_of(SimpleNamespace(session_hash=s)) for s in ("me", "stranger"))  # requests

    def stored(request, owner):
        return run_to_end(tiny, request, recorder=Recorder(store, owner=owner))

    parent = stored(RunRequest.build("greedy", {}, "Hi there", max_new_tokens=8), "session:me")
    for step in (2, 5):
        stored(branch_request(tiny, parent, step, parent.token_steps[step].top_ids[1]), "session:me")
    stored(branch_request(tiny, parent, 3, parent.token_steps[3].top_ids[1]), "session:someone")
    tree = compare.render_views([parent], "1", me)[compare.BRANCH_VIEW]
    assert tree.layout.title.text == "Branch tree (3 runs; 2 stored, not open: grey)"
    names = [t.name for t in tree.data if t.name]
    assert names[0].startswith("1: greedy") and sum(n.startswith("run ") for n in names) == 2
    alone = compare.render_views([parent], "1", stranger)[compare.BRANCH_VIEW]
    assert not alone.data  # nothing of theirs branches from it: the placeholder


def test_export_handlers_write_files(tiny_flat, tmp_path, monkeypatch):
    import zipfile

    from explorer.ui import compare, context, history

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setattr(context, "_STORE", store)
    traces = [run_to_end(tiny_flat, RunRequest.build("greedy", {}, "Hi", max_new_tokens=5),
                         recorder=Recorder(store)) for _ in range(2)]
    ids = ",".join(t.run_id for t in traces)
    assert history.export_runs(ids, "CSV")[0].endswith("steps.csv")
    assert len(history.export_runs(ids, "Bundle")) == 2
    archive = compare.export_views(traces, "1", "two")
    names = zipfile.ZipFile(archive).namelist()
    from viz.theme import has_data

    with_data = [name for name, figure in zip(compare.VIEW_NAMES, compare.render_views(traces, "1"), strict=True)
                 if has_data(figure)]
    assert "heatmap" in with_data and "beam-tree" not in with_data  # greedy lanes: no beam tree to draw
    assert {f"{v}.{fmt}" for v in with_data for fmt in ("svg", "pdf", "png")} == set(names)



@pytest.mark.browser
def test_browser_eagle_lane_uses_the_shipped_head_on_the_embedded_model(server, browser):
    """A newcomer picks `eagle` on the embedded model and leaves the drafter empty: the head shipped in
    assets/drafters drafts, the lane matches the greedy lane token for token, and the page shows its rounds. A
    `speculative` lane left on its defaults drafts with the same head (draft_model 'auto')."""
    url, db = server
    page = open_page(browser, url, "Explain what a binary search does.", strategies={1: "greedy", 2: "eagle"})
    page.get_by_role("button", name="+ lane").click()
    page.wait_for_selector("#lane3-strategy input", state="visible", timeout=30_000)
    choose_strategy(page, 3, "speculative")
    assert draft_model_box(page, 3).input_value() == "auto"
    page.get_by_label("Model (embedded, HF id or local path)").fill("embedded")
    set_number(page, "max new tokens", "20")
    page.locator("#run").click()
    page.wait_for_selector("#permalink a", timeout=120_000)
    greedy, eagle, speculative = permalink_runs(page, db)
    assert eagle.status == "ok" and eagle.started.model_id.startswith("embedded")
    assert eagle.token_ids == greedy.token_ids and eagle.mean_accepted_tokens > 1
    assert eagle.rounds and eagle.rounds[0].drafter
    metrics = page.locator("#lane2-metrics").inner_text()
    assert "mean accepted" in metrics and f"{eagle.mean_accepted_tokens:.2f}" in metrics
    assert speculative.token_ids == greedy.token_ids and speculative.started.config["draft_model"] == "auto"
    assert {r.drafter for r in speculative.rounds} == {"EAGLE head"}


@pytest.mark.browser
def test_browser_no_page_outlives_its_test(browser):
    """Runs after the module's other browser tests: the pages they opened (several each) were all closed."""
    assert browser.contexts == []


@pytest.mark.browser
def test_browser_an_engines_record_shows_beside_a_recorded_run(server, browser, tmp_path):
    """Issue 30: a vLLM response imported with the CLI opens in a lane beside one of ours (permalink): its text as
    text, its mean accepted tokens in the lane and the summary, its steps in the accepted-lengths and per-position
    views; the timeline says what vLLM does not report."""
    from explorer.cli import main
    from tests.test_engines import ADAPTIVE, run

    url, db = server
    ours = run(ADAPTIVE)
    Store(db).save_trace(ours)
    before = set(Store(db).run_ids())
    assert main(["import", "--format", "vllm", str(Path(__file__).parent / "data" / "engines" /
                                                 "vllm_responses.jsonl"), "--method", "eagle3", "--db", db]) == 0
    imported = [t for t in Store(db).load_traces(set(Store(db).run_ids()) - before)
                if t.engine_record.per_step_accepted]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{url}?compare={ours.run_id},{imported[0].run_id}")
        page.wait_for_function("(() => { const o = document.querySelector('#lane2-output');"
                               " return o && o.innerText.includes('imported from vllm'); })()", timeout=30_000)
        assert "The sea is wide and <b>grey</b>." in page.locator("#lane2-output").inner_text()
        page.wait_for_function("document.querySelector('#lane2-about').innerText.includes('Imported from vllm')",
                               timeout=10_000)
        assert page.locator("#lane2-output b").count() == 0  # the record's text is text
        assert "mean accepted" in page.locator("#lane2-metrics").inner_text()
        assert "eagle3 (vllm)" in page.locator("#lane-summary").inner_text()
        page.get_by_role("tab", name="Speculative").click()
        page.wait_for_function("(() => { const p = document.querySelector('#accepted-lengths .js-plotly-plot');"
                               " return p && p.data && p.data.length === 2; })()", timeout=30_000)
        names = page.evaluate("document.querySelector('#by-position .js-plotly-plot').data.map(d => d.name)")
        assert any("eagle3 (vllm)" in name for name in names), names
        page.screenshot(path=str(tmp_path / "engine-beside-ours.png"), full_page=True)
        if os.environ.get("DECODING_EXPLORER_SCREENSHOTS"):
            page.screenshot(path=str(Path(os.environ["DECODING_EXPLORER_SCREENSHOTS"]) / "engine-record.png"),
                            full_page=True)
    finally:
        page.close()


@pytest.mark.browser
def test_browser_seeds_per_lane_give_mean_and_interval(server, browser):
    """Issue 31: seeds per lane = 3 runs each lane's config with seeds s, s+1, s+2 once the lanes end; the
    summary shows mean ± interval over them and the quality columns; the extra runs are stored, tagged."""
    url, db = server
    page = open_page(browser, url, "Once upon a time")
    try:
        set_number(page, "max new tokens", "6")
        seeds = page.locator("#seeds input")
        seeds.fill("3")
        seeds.press("Tab")
        page.wait_for_function("document.querySelector('#seeds input').value === '3'")
        page.locator("#run").click()
        page.wait_for_function("document.querySelector('#lane-summary').innerText.includes('3 seeds')",
                               timeout=120_000)
        summary = page.locator("#lane-summary").inner_text()
        assert "±" in summary and "coherence" in summary and "distinct-2" in summary
        page.wait_for_function("!document.querySelector('#run').disabled", timeout=30_000)
        first = permalink_runs(page, db)
        store = Store(db)
        extra = [t for t in store.load_traces(store.run_ids())
                 if t.started.tags.get("seed_of") in {f.run_id for f in first}]
        assert sorted(t.started.seed for t in extra) == [1, 1, 2, 2] and all(t.status == "ok" for t in extra)
        assert all(any(e.kind == "quality_probe" for e in t.events) for t in first + extra)
    finally:
        page.close()
