"""Structural rules from ARCHITECTURE.md that a test can hold the code to."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reading_traces_does_not_import_torch():
    code = ("import sys\n"
            "import store, viz, viz.catalog, viz.report, explorer.trace, explorer.export, explorer.metrics\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_engine_never_probes_drafters():
    source = (ROOT / "explorer" / "strategies" / "draft_verify.py").read_text()
    assert "hasattr(drafter" not in source and "getattr(drafter" not in source


def test_every_drafter_declares_the_whole_contract():
    import explorer.strategies  # noqa: F401  (fills the registry and defines every drafter)
    from explorer.strategies.draft_verify import Drafter

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    drafters = set(subclasses(Drafter))
    assert len(drafters) >= 6
    for cls in drafters:
        assert isinstance(cls.wants_hidden_states, bool) and isinstance(cls.watches_logits, bool)


def test_strategies_do_not_import_each_other():
    strategies = ROOT / "explorer" / "strategies"
    shared = {"base", "acceptance", "draft_verify", "draft_models", "eagle_drafter", "beam_search", "unmasking",
              "batch_sampling", "generate_tap", "__init__"}
    names = {p.stem for p in strategies.glob("*.py")} - shared
    for path in strategies.glob("*.py"):
        if path.stem in shared:
            continue
        source = path.read_text()
        for other in names - {path.stem}:
            assert f"explorer.strategies.{other} import" not in source, (path.stem, other)
        assert "get_strategy(" not in source, path.stem  # nor run each other through the registry by name


def import_graph() -> dict[str, set[str]]:
    """Every module of explorer/, viz/ and store/ -> the project modules it imports (at the top or in a function)."""
    import ast

    modules = {}
    for path in [*ROOT.glob("explorer/**/*.py"), *ROOT.glob("viz/**/*.py"), *ROOT.glob("store/**/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_circle():
    import networkx as nx

    graph = nx.DiGraph([(a, b) for a, targets in import_graph().items() for b in targets])
    assert list(nx.simple_cycles(graph)) == []


def test_draft_sources_are_parsed_in_one_ground_floor_module():
    from explorer.draft_source import MODEL, DraftSource

    assert import_graph()["explorer.draft_source"] == set()  # the ground floor: it imports nothing of ours
    assert DraftSource.parse("") == DraftSource("target")
    assert DraftSource.parse("", empty="eagle-head").kind == "eagle-head"
    assert DraftSource.parse(" layer-skip ").builtin and DraftSource.parse("auto").builtin
    named = DraftSource.parse("HuggingFaceTB/SmolLM2-135M")
    assert named == DraftSource(MODEL, "HuggingFaceTB/SmolLM2-135M") and not named.builtin
    assert str(named) == "HuggingFaceTB/SmolLM2-135M" and str(DraftSource.parse("target")) == "target"
    for path in ROOT.glob("explorer/**/*.py"):  # no module compares the sentinel strings itself
        if path.stem != "draft_source":
            assert "BUILTIN_DRAFTS" not in path.read_text(), path


def test_limits_are_checked_from_the_field_metadata():
    import pytest

    from explorer.strategies import make_config

    with pytest.raises(ValueError, match=r"draft_length must be in \[1, 16\], got 0"):
        make_config("speculative", {"draft_length": 0})
    with pytest.raises(ValueError, match="must be a finite number"):
        make_config("diverse_beam", {"diversity": "nan"})
    with pytest.raises(ValueError, match="num_beams must be a int"):
        make_config("beam", {"num_beams": "inf"})


def test_no_draft_verify_config_redefines_a_field_of_the_sampling_rule():
    """A subclass field with the name of one of SpeculativeConfig's (rule, temperature, top_k, top_p) would
    silently change how drafts are verified (EAGLE-2's tree top-k once filtered the sampling rule to top-4)."""
    import dataclasses

    import explorer.strategies  # noqa: F401  (fills the registry)
    from explorer.strategies.base import REGISTRY
    from explorer.strategies.draft_verify import SpeculativeConfig

    rule = {field.name: field for field in dataclasses.fields(SpeculativeConfig)}
    for name, spec in REGISTRY.items():
        if issubclass(spec.config, SpeculativeConfig):
            for field in dataclasses.fields(spec.config):
                if field.name in rule:
                    assert (field.default, field.metadata) == (rule[field.name].default,
                                                               rule[field.name].metadata), (name, field.name)


def test_the_run_clock_is_the_runners_and_the_recorder_only_records(tiny):
    from explorer.recorder import Recorder
    from explorer.request import RunRequest
    from explorer.runner import RunClock, run_strategy

    recorder, clock = Recorder(), RunClock()
    seen = []
    for event in run_strategy(tiny, RunRequest.build("greedy", {}, "Hi", max_new_tokens=5), recorder=recorder,
                              clock=clock):
        seen.append((event.kind, clock.forward_passes))
    finished = recorder.trace.finished
    assert clock.busy_s == finished.wall_time_s > 0 and clock.prefill_s == finished.prefill_time_s > 0
    assert clock.forward_passes == finished.target_forward_passes == 5  # prefill + 4 single-token passes
    steps = [passes for kind, passes in seen if kind == "token_step"]
    assert steps == sorted(steps) and steps[0] == 1  # live: the passes so far, as each token arrives
    assert not {"busy_s", "forward_passes", "prefill_s"} & set(vars(recorder))
    assert "hasattr" not in (ROOT / "explorer" / "recorder.py").read_text()
