"""SPEED-Bench: its question records (JSON lines or Parquet) load as prompts whose fields every run carries, and its
per-category acceptance matrix is vLLM's arithmetic over the pooled verification steps."""

import json
import math
from pathlib import Path

import pytest

from explorer.events import DraftRound, RunFinished, RunStarted, TokenStep
from explorer.export import acceptance_matrix_latex, acceptance_matrix_markdown
from explorer.metrics import OVERALL, acceptance_matrix
from explorer.sweep import load_prompts, parse_strategies, per_category, run_sweep, write_report
from explorer.trace import Trace
from store import Store
from viz.report import acceptance_matrix_figure

SAMPLE = Path(__file__).parent / "data" / "speed_bench_sample.jsonl"
FIELDS = {"question_id", "category", "sub_category", "turns", "source", "src_id", "difficulty", "multiturn"}


def test_the_sample_is_in_speed_benchs_format():
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    for record in records:
        assert set(record) == FIELDS
        assert isinstance(record["question_id"], str) and len(record["question_id"]) == 32
        assert isinstance(record["turns"], list) and all(isinstance(t, str) for t in record["turns"])
        assert isinstance(record["multiturn"], bool) and record["multiturn"] == (len(record["turns"]) > 1)
        assert all(record[k] is None or isinstance(record[k], str) for k in ("sub_category", "difficulty"))


def test_questions_load_with_their_fields_as_tags():
    items = load_prompts(SAMPLE)
    assert [i.category for i in items] == ["coding", "coding", "math", "math", "writing", "writing", "coding"]
    first = items[0]
    assert first.name == "0a1f3c5e7b9d2f4a6c8e0b1d3f5a7c9e" and first.question_id is None and first.is_question
    assert first.tags == {"speed_bench_id": first.name, "sub_category": "code generation", "difficulty": "easy",
                          "source": "livecodebench/code_generation_lite", "src_id": "lcb_17"}
    assert "sub_category" not in items[3].tags and "difficulty" not in items[3].tags  # null in the record
    multi = items[4]
    assert multi.turns == ("Write two lines of dialogue between Ann and Bob.", "Now let Bob answer Ann once more.")
    assert multi.prompt == multi.turns[0]
    assert [i.name for i in per_category(items, 1)] == [items[0].name, items[2].name, items[4].name]


def test_a_parquet_copy_reads_like_the_json_lines(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    assert load_prompts(path) == load_prompts(SAMPLE)
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="cannot read .*broken.parquet as Parquet"):
        load_prompts(tmp_path / "broken.parquet")


@pytest.mark.parametrize(("change", "message"), [
    ({"turns": None}, "needs turns: this record has no turns"),
    ({"question_id": None, "category": ""}, "needs question_id, category: this record has no question_id and no "
                                            "category"),
    ({"turns": "one string"}, "turns must be a list of strings"),
    ({"turns": ["", " "]}, "has only empty turns"),
    ({"turns": ["FULL BENCHMARK DATA SHOULD BE FETCHED FROM THE SOURCE USING SPECDEC_BENCH\n\n{question}"]},
     "placeholder, not its prompt: resolve the turns first"),
    ({"multiturn": "yes"}, "multiturn must be true or false"),
])
def test_a_bad_record_fails_in_one_line_naming_where(tmp_path, change, message):
    lines = SAMPLE.read_text().splitlines()
    bad = json.loads(lines[2]) | change
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    with pytest.raises(ValueError) as error:
        load_prompts(path)
    text = str(error.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_spec_bench_questions_still_load_with_int_ids(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["a", "b"]}) + "\n"
                    + json.dumps({"question_id": "82", "category": "qa", "turns": ["c"]}) + "\n")
    items = load_prompts(path)
    assert [(i.question_id, i.name, i.tags) for i in items] == [(81, "q81", {}), (82, "q82", {})]


# ------------------------------------------------------------------------------------- hand-built runs
def _step(step: int, origin: str) -> TokenStep:
    return TokenStep(step=step, position=10 + step, token_id=5, token_text="a", logprob=-0.1, rank=0, entropy=0.5,
                     top_ids=[5], top_logprobs=[-0.1], top_texts=["a"], kept_top_ids=[5], kept_top_logprobs=[-0.1],
                     kept_count=1, kept_logprob=-0.1, origin=origin)


def _run(run_id: str, method: str, category: str, rounds: list[tuple[int, int]], status: str = "ok") -> Trace:
    """A run whose verification steps are `rounds`: (draft tokens proposed, accepted) per step, a chain; (0, 0)
    is a plain step that drafted nothing."""
    trace = Trace(RunStarted(
        run_id=run_id, strategy=method, config={}, model_id="tiny", weights_hash="w", dtype="float32", device="cpu",
        seed=0, versions={}, prompt=f"{category} prompt", chat=False, system_prompt=None, prompt_ids=[1, 2],
        max_new_tokens=32, stop_strings=[], created_at="2026-01-01T00:00:00",
        tags={"category": category, "method": method}))
    step = 0
    for index, (drafted, accepted) in enumerate(rounds):
        if drafted == 0:
            trace.add(_step(step, "plain"))
            step += 1
            continue
        trace.add(DraftRound(
            round=index, position=10 + step, drafter="test", rule="greedy", draft_tokens=[5] * drafted,
            draft_texts=["a"] * drafted, parents=list(range(-1, drafted - 1)), q=[0.5] * drafted,
            p=[0.5] * drafted, u=[None] * drafted,
            verdicts=["accepted"] * accepted + ["rejected"] + ["skipped"] * (drafted - accepted - 1)
            if accepted < drafted else ["accepted"] * drafted, accepted_count=accepted, bonus_token=5,
            bonus_text="a", bonus_kind="correction" if accepted < drafted else "bonus", draft_time_s=0.0,
            verify_time_s=0.0))
        for _ in range(accepted):
            trace.add(_step(step, "draft"))
            step += 1
        trace.add(_step(step, "bonus"))
        step += 1
    trace.add(RunFinished(status=status, stop_reason="length", error=None, text="a" * step, new_tokens=step,
                          wall_time_s=0.5, prefill_time_s=0.01, target_forward_passes=len(rounds)))
    return trace


@pytest.fixture
def runs() -> list[Trace]:
    return [
        _run("a", "prompt_lookup", "coding", [(4, 2), (4, 4), (0, 0)]),  # 2 drafts, 8 drafted, 6 accepted
        _run("b", "prompt_lookup", "coding", [(4, 0)]),  # 1 draft, 4 drafted, 0 accepted
        _run("c", "prompt_lookup", "math", [(3, 1), (3, 2)]),  # 2 drafts, 6 drafted, 3 accepted
        _run("d", "speculative", "writing", [(2, 1)]),
        _run("e", "speculative", "writing", [(2, 2), (2, 2)], status="failed"),  # not finished ok: left out
        _run("f", "greedy", "coding", [(0, 0), (0, 0)]),  # never drafted: no row
    ]


def test_acceptance_matrix_pools_steps_with_vllms_definitions(runs):
    categories, table = acceptance_matrix(runs)
    assert categories == ["coding", "math", "writing", OVERALL]
    assert list(table) == ["prompt_lookup", "speculative"]
    coding = table["prompt_lookup"]["coding"]
    assert (coding.runs, coding.drafts, coding.draft_tokens, coding.accepted_tokens) == (2, 3, 12, 6)
    # pooled: 1 + 6 / 3, not the mean of the runs' own lengths ((1 + 6/2) + (1 + 0/1)) / 2 = 2.5
    assert coding.mean_acceptance_length == pytest.approx(3.0)
    assert coding.draft_acceptance_rate == pytest.approx(0.5)
    assert table["prompt_lookup"]["math"].mean_acceptance_length == pytest.approx(2.5)
    overall = table["prompt_lookup"][OVERALL]
    assert (overall.runs, overall.mean_acceptance_length, overall.draft_acceptance_rate) == (3, pytest.approx(2.8),
                                                                                             pytest.approx(0.5))
    writing = table["speculative"]["writing"]
    assert (writing.runs, writing.mean_acceptance_length, writing.draft_acceptance_rate) == (1, 2.0, 0.5)
    assert "math" not in table["speculative"]
    assert acceptance_matrix([runs[-1]]) == ([], {})


def test_acceptance_tables_and_figure(runs):
    matrix = acceptance_matrix(runs)
    markdown = acceptance_matrix_markdown(matrix).splitlines()
    assert markdown[0] == ("| method | coding: MAL, accept %, runs | math: MAL, accept %, runs | writing: MAL, "
                           "accept %, runs | overall: MAL, accept %, runs |")
    assert markdown[2] == "| prompt_lookup | 3.00, 50.0%, 2 | 2.50, 50.0%, 1 | -- | 2.80, 50.0%, 3 |"
    assert markdown[3] == "| speculative | -- | -- | 2.00, 50.0%, 1 | 2.00, 50.0%, 1 |"
    latex = acceptance_matrix_latex(matrix)
    assert r"prompt\_lookup & 3.00 (50.0\%) & 2.50 (50.0\%) & -- & 2.80 (50.0\%) \\" in latex
    assert latex.startswith(r"\begin{tabular}{lrrrr}") and latex.rstrip().endswith(r"\end{tabular}")
    figure = acceptance_matrix_figure(matrix)
    heatmap = figure.data[0]
    assert list(heatmap.x) == ["coding", "math", "writing", OVERALL]
    assert list(heatmap.y) == ["prompt_lookup", "speculative"]
    assert list(heatmap.text[0]) == ["3.00", "2.50", "", "2.80"]
    assert heatmap.z[1][0] is None and figure.layout.xaxis.title.text and figure.layout.yaxis.title.text
    assert "draft acceptance 50.0%" in heatmap.hovertext[0][0]
    assert acceptance_matrix_figure(([], {})).layout.meta == {"empty": True}


def test_report_writes_the_acceptance_matrix(runs, tmp_path):
    written = {p.name for p in write_report(runs, tmp_path, formats=("svg",))}
    assert {"acceptance.md", "acceptance.tex", "acceptance.svg"} <= written
    assert "| prompt_lookup | 3.00, 50.0%, 2 |" in (tmp_path / "acceptance.md").read_text()
    plain = {p.name for p in write_report([runs[-1]], tmp_path / "plain", formats=("svg",))}
    assert not any(name.startswith("acceptance") for name in plain)  # nothing drafted: no matrix


def test_a_sweep_tags_every_run_with_the_questions_fields(tiny, tmp_path):
    items = [i for i in load_prompts(SAMPLE) if i.category == "writing"]
    store = Store(f"sqlite:///{tmp_path / 'speed.sqlite'}")
    report = run_sweep(tiny, items, parse_strategies("prompt_lookup:min_ngram=1"), 1, store, max_new_tokens=8)
    assert (report.done, report.failed) == (3, [])
    traces = store.load_traces(store.run_ids(sweep_only=True))
    multi = sorted((t for t in traces if t.started.tags["speed_bench_id"] == items[0].name),
                   key=lambda t: t.started.tags["turn"])
    assert [t.started.tags["turn"] for t in multi] == ["0", "1"] and multi[1].started.history
    tags = multi[0].started.tags
    assert {k: tags[k] for k in ("category", "sub_category", "difficulty", "source", "src_id", "turns")} == {
        "category": "writing", "sub_category": "dialogue", "difficulty": "medium",
        "source": "mtbench101/mt-bench-101", "src_id": "mtb_9", "turns": "2"}
    assert tags["prompt_name"] == items[0].name and "question_id" not in tags  # Spec-Bench's int id only
    categories, table = acceptance_matrix(traces)  # one-character n-grams: the lookup finds drafts in the prompt
    assert categories == ["writing", OVERALL]
    cell = table["prompt_lookup(min_ngram=1)"]["writing"]
    assert cell.runs == 3 and math.isfinite(cell.mean_acceptance_length) and cell.mean_acceptance_length >= 1
    store.close()
