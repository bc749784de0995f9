"""Exports for papers: tables read back equal the traces, bundles round-trip into a fresh database, figures
are valid files, sweeps resume and report, and the LaTeX tables carry the stored runs' numbers."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from explorer import export
from explorer.metrics import sampling_table, specbench_table
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.sweep import load_prompts, parse_strategies, run_sweep, write_report
from store import Store
from viz.catalog import VIEWS, render_all
from viz.paper import save_figure


@pytest.fixture(scope="module")
def traces(tiny):
    return [run_to_end(tiny, RunRequest.build("prompt_lookup", {"min_ngram": 1}, "ab ab ab ab",
                       max_new_tokens=16, chat=False)),
            run_to_end(tiny, RunRequest.build("sample", {"top_p": 0.9}, "Hello", max_new_tokens=8, seed=2))]


def expected_rows(traces):
    return [{k: v for k, v in row.items()} for row in export.step_rows(traces)]


def test_parquet_and_csv_read_back_the_same_rows(traces, tmp_path):
    rows = expected_rows(traces)
    assert len(rows) == sum(len(t.token_steps) for t in traces)
    assert any(r["verdict"] == "accepted" and r["draft_p"] is not None for r in rows)  # draft fields present
    table = pq.read_table(export.write_parquet(traces, tmp_path / "steps.parquet")).to_pylist()
    assert table == rows
    with open(export.write_csv(traces, tmp_path / "steps.csv"), newline="", encoding="utf-8") as handle:
        back = list(csv.DictReader(handle))
    assert [r["token_text"] for r in back] == [r["token_text"] for r in rows]
    for ours, theirs in zip(rows, back, strict=True):
        assert int(theirs["token_id"]) == ours["token_id"] and float(theirs["logprob"]) == ours["logprob"]
        assert theirs["run_id"] == ours["run_id"] and theirs["origin"] == ours["origin"]


def test_jsonl_is_the_event_stream(traces, tmp_path):
    path = export.write_jsonl(traces, tmp_path / "events.jsonl")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == sum(len(t.all_events()) for t in traces)
    assert lines[0]["kind"] == "run_started" and lines[-1]["kind"] == "run_finished"
    assert export.read_jsonl(path.read_text(encoding="utf-8").splitlines()) == traces


def test_bundle_round_trip_into_a_fresh_database(traces, tmp_path, store):
    for trace in traces:
        store.save_trace(trace)
    bundle = export.write_bundle(store.load_trace(traces[0].run_id), tmp_path / "run.zip")
    manifest = json.loads(__import__("zipfile").ZipFile(bundle).read("manifest.json"))
    assert manifest["seed"] == traces[0].started.seed and manifest["config"] == traces[0].started.config
    assert manifest["weights_hash"] == traces[0].started.weights_hash and "torch" in manifest["versions"]
    db = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    result = subprocess.run([sys.executable, "-m", "explorer", "import", str(bundle), "--db", db],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Store(db).load_trace(traces[0].run_id) == traces[0]
    again = subprocess.run([sys.executable, "-m", "explorer", "import", str(bundle), "--db", db],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already in" in again.stderr
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="not a run bundle"):
        export.read_bundle(tmp_path / "bad.zip")


@pytest.mark.parametrize("fmt, header", [("svg", b"<svg"), ("pdf", b"%PDF"), ("png", b"\x89PNG")])
def test_figures_export_as_valid_files(traces, tmp_path, fmt, header):
    figure = VIEWS[0].render(traces, 0)
    path = save_figure(figure, tmp_path / f"heatmap.{fmt}", width="two")
    data = path.read_bytes()
    assert data.startswith(header) and len(data) > 1000
    if fmt == "svg":
        assert "serif" in data.decode("utf-8")


def test_every_view_exports(traces, tmp_path):
    for view, figure in zip(VIEWS, render_all(traces, 0), strict=True):
        assert save_figure(figure, tmp_path / f"{view.name}.svg").read_bytes().startswith(b"<svg")


def test_bad_figure_name_is_a_clear_error(traces, tmp_path):
    with pytest.raises(ValueError, match="use a .svg, .pdf or .png"):
        save_figure(VIEWS[0].render(traces, 0), tmp_path / "x.gif")


PROMPTS = [
    {"category": "copy", "name": "abab", "prompt": "ab ab ab ab ab"},
    {"category": "free", "name": "hello", "prompt": "Hello there"},
]


def test_sweep_resumes_records_failures_and_reports(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    store = Store(f"sqlite:///{tmp_path / 'sweep.sqlite'}")
    methods = parse_strategies("greedy; prompt_lookup:min_ngram=1; sample:top_p=0.9; self_speculative:skip=5")
    report = run_sweep(tiny, load_prompts(prompts), methods, 2, store, max_new_tokens=10, chat=False)
    assert (report.done, report.skipped, len(report.failed)) == (12, 0, 4)
    assert all("cannot skip layers" in error for _, error in report.failed)
    assert sum(r.status == "failed" for r in store.list_runs(limit=100)) == 0  # refused before a run is stored
    again = run_sweep(tiny, load_prompts(prompts), methods, 2, store, max_new_tokens=10, chat=False)
    assert (again.done, again.skipped) == (0, 12)  # completed runs are skipped; the failed ones are retried

    traces = store.load_traces(store.run_ids(sweep_only=True))
    latex = export.specbench_latex(specbench_table(traces))
    body = [line for line in latex.splitlines() if line.endswith(r"\\") and not line.startswith(("Method", " &"))]
    assert [line.split(" & ")[0] for line in body] == sorted(["greedy", r"prompt\_lookup(min\_ngram=1)",
                                                              r"sample(top\_p=0.9)"])
    categories, table = specbench_table(traces)
    assert categories == ["copy", "free"]
    lookup = [t for t in traces if t.started.tags["method"] == "prompt_lookup(min_ngram=1)"
              and t.started.tags["category"] == "copy" and t.status == "ok"]
    mat = sum(t.mean_accepted_tokens for t in lookup) / len(lookup)
    assert f"{mat:.2f}" in body[1] and table["greedy"]["copy"][0] == pytest.approx(1.0)
    sampling = sampling_table(traces)
    assert sampling["greedy"]["runs"] == 4
    assert f"{sampling['greedy']['perplexity']:.2f}" in export.sampling_latex(sampling)

    written = write_report(traces, tmp_path / "report", formats=("svg",))
    names = {p.name for p in written}
    assert {"specbench.tex", "specbench.md", "sampling.tex", "sampling.md", "speedup.svg", "quality.svg"} <= names
    assert math.isfinite(table["sample(top_p=0.9)"]["free"][0])


def test_bad_sweep_specs_say_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_strategies("greedy; nope")
    with pytest.raises(ValueError, match="key=value"):
        parse_strategies("sample:top_p")
    with pytest.raises(ValueError, match="cannot read the prompt file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_export_cli(traces, tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    Store(db).save_trace(traces[0])
    for fmt, name in (("csv", "steps.csv"), ("jsonl", "events.jsonl"), ("bundle", "bundles")):
        result = subprocess.run([sys.executable, "-m", "explorer", "export", "--all", "--format", fmt, "--out",
                                 str(tmp_path / name), "--db", db], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "bundles" / f"{traces[0].run_id}.zip").exists()
    result = subprocess.run([sys.executable, "-m", "explorer", "figure", traces[0].run_id, "--view", "acceptance",
                             "--out", str(tmp_path / "acc.pdf"), "--db", db], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "acc.pdf").read_bytes().startswith(b"%PDF")


def test_a_bundles_reproduce_command_runs_as_it_is(tiny_dir, tmp_path):
    import shlex

    from explorer.cli import main
    from explorer.export import manifest

    prompt = "it's a \"quoted\" prompt; with $HOME and `ticks`"
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    request = RunRequest.build("sample", {"top_p": 0.9}, prompt, seed=3, max_new_tokens=5, chat=False)
    from explorer.models import load_model

    original = run_to_end(load_model(str(tiny_dir)), request, recorder=Recorder(Store(db)))
    command = manifest(original)["reproduce"]
    words = shlex.split(command)
    assert "PROMPT" not in words and words[:4] == ["python", "-m", "explorer", "run"]
    assert words[words.index("--prompt") + 1] == prompt
    words[words.index("--model") + 1] = str(tiny_dir)  # the tiny model's id is its path's name here
    assert main([*words[3:], "--db", db, "--quiet"]) == 0
    again = Store(db).load_trace(Store(db).list_runs()[0].run_id)
    assert again.token_ids == original.token_ids and again.started.config == original.started.config


def _boxes_overlap(a: dict, b: dict, slack: float = 1.0) -> bool:
    return (a["left"] + slack < b["right"] and b["left"] + slack < a["right"]
            and a["top"] + slack < b["bottom"] and b["top"] + slack < a["bottom"])


@pytest.mark.browser
@pytest.mark.parametrize("width", ["one", "two"])
def test_paper_figures_keep_legend_titles_and_data_apart(tiny, tmp_path, width):
    """Every view with data, exported for print: the legend is outside every plot area, the title inside the
    canvas, and no two axis titles (or an axis title and the legend) overlap — measured on the SVG's own text
    boxes in Chromium."""
    import shutil

    from viz.theme import has_data

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    runs = [("greedy", {}), ("sample", {"top_p": 0.9}), ("prompt_lookup", {"min_ngram": 1}), ("jacobi", {}),
            ("beam", {}), ("mirostat", {}), ("top_h", {}), ("tree_speculative", {}), ("self_speculative", {}),
            ("contrastive", {}), ("momentum", {}), ("cautious", {"h_min": 0.1, "h_max": 1.0, "max_trial_tokens": 8}),
            ("token_recycling", {})]
    traces = [run_to_end(tiny, RunRequest.build(n, p, "ab ab ab ab", max_new_tokens=12, chat=False)) for n, p in runs]
    files = []
    groups = [traces[i:i + 4] for i in range(0, len(traces), 4)]  # the app shows at most 4 lanes
    for view in VIEWS:
        figure = next((f for group in groups for lane in range(len(group))
                       if has_data(f := view.render(group, lane))), None)
        if figure is not None:
            files.append(save_figure(figure, tmp_path / f"{view.name}.svg", width=width))
    assert len(files) >= 15
    measure = """() => {
        const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top,
                           bottom: r.bottom, width: r.width, height: r.height}; };
        const svg = box(document.querySelector('svg'));
        const plots = [...document.querySelectorAll('.bglayer .bg')].map(box).filter(b => b.width > 0);
        const legend = document.querySelector('g.legend');
        const title = document.querySelector('.gtitle');
        const axes = [...document.querySelectorAll('.g-xtitle text, .g-ytitle text, .g-x2title text, .g-y2title text')]
            .filter(t => t.textContent.trim()).map(box);
        return {svg, plots, legend: legend ? box(legend) : null, title: title ? box(title) : null, axes};
    }"""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        for path in files:
            page.goto(path.as_uri())
            found = page.evaluate(measure)
            canvas = found["svg"]
            if found["title"]:
                title = found["title"]
                assert canvas["left"] - 1 <= title["left"] and title["right"] <= canvas["right"] + 1, path.name
                assert canvas["top"] - 1 <= title["top"], path.name
            if found["legend"] and found["legend"]["height"] > 0:
                for plot in found["plots"]:
                    assert not _boxes_overlap(found["legend"], plot, slack=2.0), f"{path.name}: legend on the plot"
                for axis in found["axes"]:
                    assert not _boxes_overlap(found["legend"], axis), f"{path.name}: legend on an axis title"
            for i, a in enumerate(found["axes"]):
                for b in found["axes"][i + 1:]:
                    assert not _boxes_overlap(a, b), f"{path.name}: axis titles overlap"
        browser.close()
