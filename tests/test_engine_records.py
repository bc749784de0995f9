"""The engines' per-request records out and in: fixtures written from each engine's documented shape
(tests/data/engines: vLLM PR #48915's response, SGLang's /generate meta_info, AIPerf's profile_export.jsonl)
import as external runs that the store keeps and the views draw beside ours; our runs export in each shape and
read back to the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from explorer.cli import main
from explorer.engine_records import read_records, write_records
from explorer.engines import engine_metrics, sglang_metrics, spec_steps, vllm_metrics
from explorer.specbench import answers, write_answers
from explorer.trace import Trace
from store import Store
from tests.test_engines import ADAPTIVE, CHAIN4, run, started
from viz.catalog import get_view

DATA = Path(__file__).parent / "data" / "engines"


def test_a_vllm_response_imports_with_its_steps_and_text():
    detailed, summary = read_records("vllm", DATA / "vllm_responses.jsonl")
    assert detailed.started.strategy == "external" and detailed.started.tags["external"] == "vllm"
    assert detailed.started.model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert detailed.text == " The sea is wide and <b>grey</b>." and detailed.new_tokens == 13
    record = detailed.engine_record
    assert record.per_step_accepted == [2, 0, 1, 3, 0, 0] and record.per_step_drafted == [3] * 6
    ours = vllm_metrics(spec_steps(detailed))  # recomputed from the steps: the engine's own numbers
    for key in ("mean_acceptance_length", "draft_acceptance_rate", "acceptance_histogram", "num_spec_steps"):
        assert ours[key] == pytest.approx(record.reported[key]), key
    assert detailed.acceptance_by_depth() == pytest.approx([3 / 6, 2 / 6, 1 / 6])  # accepted at i / drafted i
    # the summary level: totals and the histogram only
    assert summary.engine_record.per_step_accepted == [] and summary.engine_record.acceptance_histogram == [39, 1, 0, 3]
    assert engine_metrics(summary)["vllm"]["mean_acceptance_length"] == pytest.approx(1 + 10 / 43)
    assert summary.finished.stop_reason == "length"


def test_sglang_meta_info_imports_under_both_generations_of_names():
    new, old = read_records("sglang", DATA / "sglang_generate.jsonl")
    assert new.mean_accepted_tokens == pytest.approx(2.4651162790697674)  # completion tokens / verify passes
    assert new.token_ids == list(range(100, 206)) and new.finished.wall_time_s == pytest.approx(1.84)
    assert sglang_metrics(spec_steps(new))["spec_accept_rate"] == pytest.approx(0.2930232558139535)
    assert old.engine_record.accepted_tokens == 4 and old.engine_record.drafted_tokens == 16
    assert old.engine_record.acceptance_histogram == [1, 2, 1, 0, 0]
    assert old.finished.stop_reason == "stop"


def test_aiperf_records_import_with_failures_kept_as_failed():
    spec, plain, failed = read_records("aiperf", DATA / "aiperf_profile_export.jsonl", method="eagle3-vllm")
    assert {t.started.tags["method"] for t in (spec, plain, failed)} == {"eagle3-vllm"}
    assert spec.started.tags["served_by"] == "vllm" and spec.text == ""  # AIPerf keeps no output text
    assert spec.engine_record.acceptance_histogram == [4, 3, 2, 1, 6]  # sparse {j: steps} made dense
    assert engine_metrics(spec)["vllm"]["mean_acceptance_length"] == pytest.approx(1 + 34 / 16)
    assert spec.finished.wall_time_s == pytest.approx(0.42) and spec.finished.prefill_time_s == pytest.approx(0.0552)
    assert plain.engine_record.steps is None and engine_metrics(plain)["vllm"]["mean_acceptance_length"] is None
    assert failed.status == "failed" and "engine died" in failed.finished.error


@pytest.mark.parametrize("kind", ["vllm", "sglang", "aiperf"])
def test_our_runs_export_in_each_shape_and_read_back_to_the_same_numbers(kind, tmp_path):
    ours = [run(ADAPTIVE), run([(CHAIN4, [0, 1, 2, 3]), (CHAIN4, [0])])]
    path = write_records(kind, ours, tmp_path / f"{kind}.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    back = read_records(kind, path)
    for mine, theirs in zip(ours, back, strict=True):
        want, got = spec_steps(mine), spec_steps(theirs)
        if kind == "sglang":  # SGLang reports totals and the histogram: its own numbers survive
            for key in ("spec_accept_length", "spec_accept_rate", "spec_verify_ct"):
                assert sglang_metrics(got)[key] == pytest.approx(sglang_metrics(want)[key]), key
        else:  # vLLM's detailed level and AIPerf keep the per-step counts of the steps that drafted
            for key in ("mean_acceptance_length", "draft_acceptance_rate", "acceptance_histogram",
                        "per_step_accepted", "per_step_drafted"):
                assert vllm_metrics(got)[key] == pytest.approx(vllm_metrics(want)[key]), key
    first = lines[0]
    if kind == "vllm":
        spec = first["metrics"]["speculative_decoding"]
        assert spec["num_spec_steps"] == 3 and spec["acceptance_histogram"] == [1, 0, 2, 0, 0]
        assert first["usage"]["completion_tokens"] == 8
    elif kind == "sglang":
        assert first["meta_info"]["spec_verify_ct"] == 4 and first["meta_info"]["spec_accept_length"] == 2.0
    else:
        assert first["spec_decode_acceptance"]["acceptance_histogram"] == {"0": 1, "2": 2}
        assert first["metrics"]["request_latency"] == {"value": 1000.0, "unit": "ms"}


def test_a_run_without_drafts_exports_without_spec_fields(tmp_path):
    plain = run([None, None])
    vllm = json.loads(write_records("vllm", [plain], tmp_path / "v.jsonl").read_text())
    sglang = json.loads(write_records("sglang", [plain], tmp_path / "s.jsonl").read_text())
    aiperf = json.loads(write_records("aiperf", [plain], tmp_path / "a.jsonl").read_text())
    assert "metrics" not in vllm and "spec_verify_ct" not in sglang["meta_info"]
    assert aiperf["spec_decode_acceptance"] is None


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("kind", "lines", "message"), [
    ("vllm", ['{"metrics": {"speculative_decoding": {"num_spec_steps": 4, "num_accepted_draft_tokens": 3, '
              '"acceptance_histogram": [1, 1, 1]}}}'], "acceptance_histogram counts 3 steps, not 4"),
    ("vllm", ['{"choices": [{"text": "a"}]}', "not json"], "2: not JSON"),
    ("sglang", ['{"text": "a"}'], "lacks 'meta_info'"),
    ("aiperf", ['{"metadata": {}, "metrics": {}, "spec_decode_acceptance": {"num_spec_steps": 2, '
                '"num_accepted_draft_tokens": 9, "num_draft_tokens": 4}}'], "9 accepted draft tokens of 4"),
    ("aiperf", ['{"metadata": {}, "metrics": {}, "spec_decode_acceptance": {"acceptance_histogram": {"x": 1}}}'],
     "keys must be counts"),
    ("specbench", ['{"question_id": 1, "choices": [{"turns": ["a"], "new_tokens": [3], "wall_time": [1.0], '
                   '"accept_lengths": [2, 0]}]}'], "one length >= 1"),
])
def test_a_bad_file_fails_in_one_line_and_stores_nothing(kind, lines, message, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    good = DATA / "vllm_responses.jsonl"
    assert main(["import", "--format", "vllm", str(good), "--db", db]) == 0
    before = set(Store(db).run_ids())
    path = _lines(tmp_path / "bad.jsonl", [*lines])
    capsys.readouterr()
    assert main(["import", "--format", kind, str(path), "--db", db]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert set(Store(db).run_ids()) == before


def test_imported_runs_are_stored_and_drawn_beside_ours(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    for kind, name in (("vllm", "vllm_responses.jsonl"), ("sglang", "sglang_generate.jsonl"),
                       ("aiperf", "aiperf_profile_export.jsonl")):
        assert main(["import", "--format", kind, str(DATA / name), "--db", db]) == 0
    assert "imported 3 aiperf records" in capsys.readouterr().out
    store = Store(db)
    stored = store.load_traces(store.run_ids())
    assert len(stored) == 7 and all(t.started.strategy == "external" for t in stored)
    vllm = next(t for t in stored if t.engine_record.per_step_accepted)
    assert vllm.engine_record.per_step_accepted == [2, 0, 1, 3, 0, 0]  # the store keeps the record
    ours = run(ADAPTIVE)
    lanes = [ours, vllm]
    histogram = get_view("accepted-lengths").render(lanes, 0)
    assert [list(bar.y) for bar in histogram.data] == [[1, 0, 2, 0, 0], [3, 1, 1, 1]]
    by_position = get_view("by-position").render(lanes, 0)
    assert len(by_position.data) == 2 and list(by_position.data[1].y) == pytest.approx([0.5, 1 / 3, 1 / 6])
    per_step = get_view("acceptance").render(lanes, 1)
    assert "as vllm reported it" in per_step.layout.title.text and len(per_step.data[0].z) == 6
    assert "does not report draft and verify time" in get_view("timeline").render(lanes, 1).layout.annotations[0].text
    sglang = next(t for t in stored if t.engine_record.request_id == "5b1e")  # totals and a histogram only
    assert "totals only" in get_view("acceptance").render([sglang], 0).layout.annotations[0].text
    marginal = get_view("by-position").render([sglang], 0).data[0]
    assert "marginal" in marginal.name and list(marginal.y) == pytest.approx([32 / 43, 18 / 43, 7 / 43, 3 / 43, 3 / 43])
    for view in ("heatmap", "entropy", "draft-tree"):  # views that need tokens: an empty figure, no error
        assert get_view(view).render([sglang], 0) is not None


def test_spec_bench_answers_round_trip_through_an_import(tmp_path):
    """A Spec-Bench answer file (ours here; another method's in use) imports as runs that the leaderboard reads:
    the same accept lengths, tokens, times and texts come back out."""
    traces = []
    for question, turns in ((81, 2), (101, 1)):
        for turn in range(turns):
            trace = run(ADAPTIVE if turn == 0 else [(CHAIN4, [0, 1, 2, 3]), None])
            trace.started = started(f"{question:010d}{turn:02d}"[:12].replace("0", "a", 1))
            trace.started.tags.update({"question_id": str(question), "turn": str(turn), "turns": str(turns),
                                       "category": "writing", "method": "pld"})
            traces.append(trace)
    [path] = write_answers(traces, tmp_path / "answers")
    imported = read_records("specbench", path)
    assert {t.started.tags["method"] for t in imported} == {"pld"}  # from the file name MODEL-METHOD.jsonl
    want, got = answers(traces), answers(imported)
    assert list(want) == list(got)
    for a, b in zip(next(iter(want.values())), next(iter(got.values())), strict=True):
        assert a["question_id"] == b["question_id"] and a["category"] == b["category"]
        for key in ("turns", "new_tokens", "wall_time", "accept_lengths", "decoding_steps"):
            assert a["choices"][0][key] == b["choices"][0][key], key
    assert imported[0].mean_accepted_tokens == pytest.approx(2.0)


def test_export_in_the_engines_shapes_and_as_a_dataset_from_the_cli(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    store = Store(db)
    ours: Trace = run(ADAPTIVE)
    store.save_trace(ours)
    out = tmp_path / "vllm.jsonl"
    assert main(["export", ours.run_id, "--format", "vllm", "--out", str(out), "--db", db]) == 0
    assert json.loads(out.read_text())["metrics"]["speculative_decoding"]["num_spec_steps"] == 3
    assert main(["export", "--all", "--format", "hf-dataset", "--out", str(tmp_path / "ds"), "--db", db]) == 0
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "configs:" in card and "python -m explorer export --all --format hf-dataset" in card
    capsys.readouterr()
    assert main(["export", "--all", "--format", "csv", "--out", str(tmp_path / "x.csv"), "--push-to-hub", "a/b",
                 "--db", db]) == 2
    assert "--push-to-hub goes with --format hf-dataset" in capsys.readouterr().err


def test_the_report_puts_imported_records_in_the_category_matrix_beside_ours(tmp_path):
    from explorer.sweep import write_report

    ours = run(ADAPTIVE)
    ours.started.tags.update({"category": "coding", "method": "ours"})
    theirs = read_records("aiperf", DATA / "aiperf_profile_export.jsonl", method="eagle3", category="coding")
    written = write_report([ours, *theirs], tmp_path / "report", formats=("svg",))
    assert tmp_path / "report" / "acceptance.md" in written
    table = (tmp_path / "report" / "acceptance.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("|")}
    assert "3.12" in rows["eagle3"] and "2.33" in rows["ours"]  # 1 + 34/16 and 1 + 4/3, vLLM's definition
