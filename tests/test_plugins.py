"""Plugins (explorer/plugins.py, explorer/api.py, examples/plugins/): the public names are pinned; a plugin file or
module loads by path, by module name, through the environment, the CLI's --plugin and an entry point; a broken one
is one line and the rest loads; the example drafter is token-identical to greedy; the example sampler's view draws;
a plugin's strategy is in the app's choices, runs in a sweep and stays out of the fidelity ledger; nothing a
visitor sends can name a plugin."""

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from explorer import plugins
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.base import REGISTRY
from viz.catalog import VIEW_NAMES, VIEWS, get_view
from viz.theme import has_data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "plugins"
NSIGMA, PERIOD = EXAMPLES / "top_nsigma.py", EXAMPLES / "period_drafter.py"
REPEATING = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2"

API_NAMES = {
    "register", "register_diffusion", "register_view", "register_logits_processor",
    "param", "Checked", "SamplingFilters", "SpeculativeConfig", "UnmaskingConfig",
    "Choice", "commit_token", "autoregressive",
    "Drafter", "DraftTree", "Verdict", "draft_verify",
    "Acceptance", "NodeRule", "Judgement", "Walk", "GreedyMatch", "RejectionSampling",
    "Schedule", "StepView", "Decision",
    "Event", "Detail", "EVENT_TYPES", "RunStarted", "TokenStep", "RunFinished", "DraftRound", "BeamStep",
    "BeamResult", "CandidateStep", "TrialBranch", "PoolUpdate", "LensStep", "AttentionStep", "UnmaskStep",
    "CacheDrift", "MbrResult", "FinishRace", "ExtractSpans", "LatticeResult", "SuperposedStep", "SuperposedResult",
    "EngineRecord", "QualityProbe", "View", "Trace", "pick", "empty_figure", "base_layout", "lane_color",
}


@pytest.fixture
def clean_registry():
    """Whatever a test's plugins register is gone afterwards: the strategies, the views, the loader's record and
    the plugin modules, so that tests iterating the registry (every strategy runs, the ledger) never see them."""
    strategies, views, names, loaded = dict(REGISTRY), list(VIEWS), list(VIEW_NAMES), dict(plugins._LOADED)
    modules = set(sys.modules)
    yield
    REGISTRY.clear()
    REGISTRY.update(strategies)
    VIEWS[:], VIEW_NAMES[:] = views, names
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)
    for name in set(sys.modules) - modules:
        if name.startswith("decoding_explorer_plugin_") or name in ("top_nsigma", "period_drafter", "ep_setup"):
            del sys.modules[name]


def cli(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "explorer", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_the_api_names_are_pinned_and_versioned():
    import explorer.api as api

    assert set(api.__all__) == API_NAMES and len(api.__all__) == len(API_NAMES)
    assert all(getattr(api, name) is not None for name in api.__all__)
    assert api.__version__ == "1.2"
    assert f"## explorer.api {api.__version__}" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert all(getattr(api, cls.__name__) is cls for cls in api.EVENT_TYPES.values())  # every event type


def test_a_plugin_file_loads_by_path_runs_and_draws_its_view(tiny, clean_registry):
    assert plugins.load_plugins([str(NSIGMA)], entry_points=False) == []
    spec = REGISTRY["top_nsigma"]
    assert (spec.plugin, spec.group, spec.family) == (str(NSIGMA), "plugins", "sampling")
    assert plugins.load_plugins([str(NSIGMA)], entry_points=False) == []  # twice: nothing more happens
    assert [p.strategies for p in plugins.loaded()] == [("top_nsigma",)] and VIEW_NAMES[-1] == "top-nsigma"

    trace = run_to_end(tiny, RunRequest.build("top_nsigma", {"n": 1.0}, "Hello", max_new_tokens=8, seed=1))
    assert trace.status == "ok" and len(trace.token_ids) == 8 and trace.has_step_detail("nsigma_threshold")
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, "Hello", max_new_tokens=8))
    only_top = run_to_end(tiny, RunRequest.build("top_nsigma", {"n": 0.0}, "Hello", max_new_tokens=8, seed=1))
    assert only_top.token_ids == greedy.token_ids  # n = 0 keeps the top token alone: greedy decoding

    view = get_view("top-nsigma")
    figure = view.render([greedy, trace], 0)  # the greedy lane is chosen; the view falls back to its own lane
    assert has_data(figure) and figure.layout.xaxis.title.text == "step" and figure.data[0].hovertemplate
    assert not has_data(view.render([greedy], 0))


def test_a_plugin_module_loads_by_name_and_the_drafter_equals_greedy(tiny, clean_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert plugins.load_plugins(["period_drafter"], entry_points=False) == []
    assert REGISTRY["period_draft"].plugin == "period_drafter" and plugins.sources() == ["period_drafter"]
    from period_drafter import find_period

    assert find_period([5, 1, 2, 3, 1, 2, 3], 8, 3) == 3 and find_period([1, 2, 3, 4], 8, 1) == 0
    for prompt in (REPEATING, "Hello there"):
        greedy = run_to_end(tiny, RunRequest.build("greedy", {}, prompt, max_new_tokens=16))
        drafted = run_to_end(tiny, RunRequest.build("period_draft", {"min_repeat": 2}, prompt, max_new_tokens=16))
        assert drafted.token_ids == greedy.token_ids
    assert drafted.rounds and any(r.accepted_count for r in drafted.rounds)  # it drafted, and drafts were taken


def test_a_broken_plugin_is_one_line_and_the_rest_loads(tmp_path, clean_registry):
    broken = tmp_path / "broken.py"
    broken.write_text("from explorer.api import register\ndef oops(:\n")
    clash = tmp_path / "clash.py"
    clash.write_text("from explorer.api import register, Checked\n"
                     "register('mine_ok', Checked, 'fine')(lambda *a: iter(()))\n"
                     "register('greedy', Checked, 'taken')(lambda *a: iter(()))\n")
    view_clash = tmp_path / "view_clash.py"
    view_clash.write_text("from explorer.api import register_view, View\n"
                          "register_view(View('fresh', 'Plugins', 'fresh', lambda traces, lane: None))\n"
                          "register_view(View('heatmap', 'Plugins', 'taken', lambda traces, lane: None))\n")
    errors = plugins.load_plugins([str(broken), str(clash), "no_such_plugin_module", str(view_clash), str(NSIGMA),
                                   str(tmp_path / "missing.py")], entry_points=False)
    assert len(errors) == 5 and all("\n" not in e for e in errors)
    assert errors[0].startswith(f"plugin {broken}: SyntaxError")
    assert errors[1] == f"plugin {clash}: ValueError: strategy 'greedy' is already registered: give this one " + (
        "another name")
    assert "ModuleNotFoundError" in errors[2] and "no_such_plugin_module" in errors[2]
    assert "view 'heatmap' is already registered" in errors[3] and "no such file" in errors[4]
    assert "mine_ok" not in REGISTRY and "fresh" not in VIEW_NAMES  # a failed plugin is undone as a whole
    assert REGISTRY["greedy"].plugin == "" and "top_nsigma" in REGISTRY  # the built-in kept, the good one loaded


def test_entry_points_load_installed_plugins(tmp_path, clean_registry, monkeypatch):
    (tmp_path / "ep_setup.py").write_text(
        "from explorer.api import Checked, register\n"
        "def setup():\n"
        "    register('ep_made', Checked, 'registered by a function entry point')(lambda *a: iter(()))\n")
    info = tmp_path / "demo_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\nnsigma = top_nsigma\n"
                                           "made = ep_setup:setup\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert plugins.load_plugins([]) == []
    assert REGISTRY["top_nsigma"].plugin == "entry point nsigma" and REGISTRY["ep_made"].plugin == "entry point made"
    assert plugins.sources() == []  # a worker finds entry points itself
    assert plugins.load_plugins([], entry_points=False) == []


def test_a_plugin_is_listed_under_plugins_in_the_app_and_stays_out_of_the_ledger(clean_registry):
    from explorer import fidelity
    from explorer.ui import compare

    assert plugins.load_plugins([str(NSIGMA), str(PERIOD)], entry_points=False) == []
    choices = compare.strategy_choices()
    assert choices[0] == ("greedy · sampling", "greedy")
    assert choices[-2:] == [("period_draft · plugins", "period_draft"), ("top_nsigma · plugins", "top_nsigma")]
    assert "not in the fidelity ledger" in compare.strategy_about("top_nsigma")
    assert "top_nsigma" in compare.strategy_names()
    assert "top_nsigma" not in {e.name for e in fidelity.ledger()}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert fidelity.readme_section(readme) == fidelity.ledger_markdown()  # the README's ledger is unchanged


def test_plugin_strategies_run_in_a_sweep_and_export(tiny, store, tmp_path, clean_registry):
    from explorer import export
    from explorer.sweep import PromptItem, parse_strategies, run_sweep

    assert plugins.load_plugins([str(NSIGMA), str(PERIOD)], entry_points=False) == []
    items = [PromptItem("copy", "c1", REPEATING), PromptItem("chat", "c2", "Hello")]
    methods = parse_strategies("greedy; top_nsigma:n=1.5; period_draft:min_repeat=2")
    report = run_sweep(tiny, items, methods, 1, store, max_new_tokens=6)
    assert (report.done, report.failed) == (6, [])
    traces = store.load_traces(store.run_ids(sweep_only=True))
    by = {(t.started.tags["prompt_name"], t.started.strategy): t.token_ids for t in traces}
    assert by[("c1", "period_draft")] == by[("c1", "greedy")] and by[("c2", "period_draft")] == by[("c2", "greedy")]
    assert run_sweep(tiny, items, methods, 1, store, max_new_tokens=6).skipped == 6  # resumes, as built-ins do
    lines = export.write_jsonl(traces, tmp_path / "runs.jsonl").read_text().splitlines()
    assert any('"top_nsigma"' in line for line in lines)


def test_a_worker_process_loads_the_same_plugin_and_unpickles_its_configs(clean_registry):
    """A Ray worker gets the driver's plugin sources and then the cells, whose configs unpickle by module name."""
    from explorer.strategies import make_config

    assert plugins.load_plugins([str(NSIGMA)], entry_points=False) == []
    config = pickle.dumps(make_config("top_nsigma", {"n": 2.5}))
    code = ("import pickle, sys\nfrom explorer.plugins import load_plugins\n"
            "assert load_plugins(sys.argv[1:], entry_points=False) == []\n"
            "print(pickle.loads(sys.stdin.buffer.read()))")
    out = subprocess.run([sys.executable, "-c", code, *plugins.sources()], input=config, capture_output=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "TopNSigmaConfig(n=2.5, temperature=1.0)"


def test_the_cli_loads_plugins_by_flag_and_environment_and_warns_in_one_line(tiny_dir, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def broken(:\n")
    env = {"DECODING_EXPLORER_PLUGINS": f"{broken}, period_drafter", "PYTHONPATH": str(EXAMPLES),
           "DECODING_EXPLORER_DB": f"sqlite:///{tmp_path / 'cli.sqlite'}"}
    result = cli("--plugin", "examples/plugins/top_nsigma.py", "run", "--strategy", "top_nsigma", "--param", "n=1.5",
                 "--prompt", "Hello", "--model", str(tiny_dir), "--max-new-tokens", "6", "--json", "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: plugin {broken}: SyntaxError")


def test_the_cli_lists_the_environments_plugins(monkeypatch, capsys, clean_registry):
    from explorer.cli import main

    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv(plugins.ENV, "period_drafter")
    assert main(["strategies"]) == 0
    listed = capsys.readouterr().out
    assert "period_draft: draft the next tokens by continuing the text's period (plugin period_drafter)" in listed
    assert "top_nsigma" not in listed  # --plugin is for one command; the environment names only period_drafter


def test_no_visitor_input_names_a_plugin():
    """Plugins load at start from the owner's environment and installed packages; a Space's visitors cannot name
    one: the app's API functions take no such input, and load_plugins is called from three places only."""
    app = ast.parse((ROOT / "app.py").read_text())
    for function in (n for n in app.body if isinstance(n, ast.FunctionDef) and n.name in ("generate", "branch")):
        assert not [a.arg for a in function.args.args if "plugin" in a.arg], function.name
    calls = {}
    for path in [ROOT / "app.py", *ROOT.glob("explorer/**/*.py"), *ROOT.glob("viz/**/*.py"),
                 *ROOT.glob("store/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_plugins":
                calls.setdefault(path.relative_to(ROOT).as_posix(), []).append(ast.unparse(node.args[0]))
    assert calls == {"app.py": ["specs_from_env()"], "explorer/cli.py": ["[*specs_from_env(), *args.plugin]"],
                     "explorer/ray_sweep.py": ["plugins"]}
    assert not any("explorer.plugins" in path.read_text() for path in ROOT.glob("explorer/ui/*.py"))


def test_nothing_of_ours_imports_the_public_api():
    """explorer.api is a facade for plugins: the project's own modules import what it re-exports from its home."""
    from tests.test_architecture import import_graph

    assert [name for name, targets in import_graph().items() if "explorer.api" in targets] == []
