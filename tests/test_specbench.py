"""Spec-Bench: its question file runs as multi-turn sweeps, its answer files come out field by field, and our
metrics are the arithmetic of its speed script."""

import json
from pathlib import Path

import numpy as np
import pytest

from explorer.cli import main
from explorer.specbench import MT_BENCH, TASKS, accept_lengths, answers, equality, speed_table
from explorer.sweep import load_prompts, parse_strategies, per_category, run_sweep
from store import Store

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write ab ab ab.", "Now again: ab ab."]},
    {"question_id": 82, "category": "writing", "turns": ["Write cd cd.", "Shorter."]},
    {"question_id": 101, "category": "coding", "turns": ["def f(): return f", "Fix f."]},
    {"question_id": 201, "category": "translation", "turns": ["Translate: ab ab ab ab"]},
    {"question_id": 301, "category": "qa", "turns": ["Who? ab ab"]},
    {"question_id": 401, "category": "rag", "turns": ["xy xy xy xy"]},
]
ANSWER_FIELDS = {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
CHOICE_FIELDS = {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}


@pytest.fixture
def question_file(tmp_path) -> Path:
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def reference_speed(method_file: Path, base_file: Path, task: str) -> tuple[float, float, float, float]:
    """Spec-Bench's evaluation/speed.py arithmetic, restated from its description (base tokens: new_tokens)."""
    def rows(path: Path) -> list[dict]:
        data = [json.loads(line) for line in path.read_text().splitlines()]
        if task == "overall":
            return data
        if task == "mt_bench":
            return [d for d in data if d["category"] in MT_BENCH]
        return [d for d in data if d["category"] == task]

    speeds, lengths = [], []
    for d in rows(method_file):
        speeds.append(sum(d["choices"][0]["new_tokens"]) / sum(d["choices"][0]["wall_time"]))
        lengths.extend(d["choices"][0]["accept_lengths"])
    base = [sum(d["choices"][0]["new_tokens"]) / sum(d["choices"][0]["wall_time"]) for d in rows(base_file)]
    return float(np.mean(lengths)), float(np.mean(speeds)), float(np.mean(base)), float(np.mean(speeds) / np.mean(base))


def test_question_file_loads_as_conversations(question_file):
    items = load_prompts(question_file)
    assert [i.question_id for i in items] == [81, 82, 101, 201, 301, 401]
    assert items[0].turns == ("Write ab ab ab.", "Now again: ab ab.") and items[0].prompt == "Write ab ab ab."
    assert [i.question_id for i in per_category(items, 1)] == [81, 101, 201, 301, 401]
    with pytest.raises(ValueError, match="per-category must be >= 1"):
        per_category(items, 0)


def test_sweep_export_metrics_and_equality(tiny, question_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'bench.sqlite'}"
    store = Store(url)
    items = per_category(load_prompts(question_file), 1)
    methods = parse_strategies("greedy; prompt_lookup:min_ngram=1")
    report = run_sweep(tiny, items, methods, 1, store, max_new_tokens=12)
    turns = sum(len(i.turns) for i in items)
    assert (report.done, report.skipped, report.failed) == (2 * turns, 0, [])
    again = run_sweep(tiny, items, methods, 1, store, max_new_tokens=12)
    assert (again.done, again.skipped) == (0, 2 * turns)  # resumable: every turn is found by its key

    traces = store.load_traces(store.run_ids(sweep_only=True))
    second = [t for t in traces if t.started.tags.get("question_id") == "81" and t.started.tags["turn"] == "1"]
    first = [t for t in traces if t.started.tags.get("question_id") == "81" and t.started.tags["turn"] == "0"]
    for turn_two in second:  # the answer of turn 1 is in the context of turn 2
        answer = next(t for t in first if t.started.tags["method"] == turn_two.started.tags["method"]).text.strip()
        assert turn_two.started.history == [["Write ab ab ab.", answer]]
        assert len(turn_two.started.prompt_ids) > len(first[0].started.prompt_ids)
    for trace in traces:
        lengths = accept_lengths(trace)
        assert sum(lengths) == len(trace.token_steps) and np.mean(lengths) == pytest.approx(trace.mean_accepted_tokens)

    out = tmp_path / "answers"
    assert main(["export", "--all", "--format", "specbench", "--out", str(out), "--db", url]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["tiny-random-llama-greedy.jsonl", "tiny-random-llama-prompt_lookup_min_ngram=1.jsonl"]
    for path in out.iterdir():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [81, 101, 201, 301, 401]
        for row, item in zip(rows, items, strict=True):
            assert set(row) == ANSWER_FIELDS and row["model_id"] == path.stem
            assert row["category"] == item.category and isinstance(row["tstamp"], float)
            assert len(row["choices"]) == 1 and set(row["choices"][0]) == CHOICE_FIELDS
            choice = row["choices"][0]
            assert choice["index"] == 0 and len(choice["turns"]) == len(item.turns)
            for name in ("decoding_steps", "new_tokens", "wall_time"):
                assert len(choice[name]) == len(item.turns)
            assert all(isinstance(t, str) for t in choice["turns"])
            assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])
            assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])

    greedy_file, lookup_file = out / files[0], out / files[1]
    found = answers(traces)
    table = speed_table(found[lookup_file.stem], found[greedy_file.stem])
    assert set(table) == set(TASKS) - {"summarization", "math_reasoning"}
    for task, row in table.items():
        mat, tps, _, speedup = reference_speed(lookup_file, greedy_file, task)
        assert (row.mean_accepted_tokens, row.tokens_per_s, row.speedup) == pytest.approx((mat, tps, speedup))
    assert table["overall"].mean_accepted_tokens > 1.0  # prompt lookup accepted some drafts
    assert equality(found[lookup_file.stem], found[greedy_file.stem]) == (True, None)  # greedy rule: lossless
    changed = json.loads(json.dumps(found[lookup_file.stem]))
    changed[2]["choices"][0]["turns"][0] += "!"
    assert equality(changed, found[greedy_file.stem]) == (False, 201)

    report = tmp_path / "report"
    assert main(["report", "--db", url, "--out", str(report), "--formats", "svg"]) == 0
    board = (report / "leaderboard.md").read_text()
    assert "mt_bench: speedup, MAT" in board and "| tiny-random-llama-prompt_lookup_min_ngram=1 |" in board
    assert board.count("| yes |") == 2


def test_sweep_without_a_question_file_says_where_to_get_one(monkeypatch, capsys):
    monkeypatch.setattr("explorer.specbench.DEFAULT_QUESTIONS", Path("/nonexistent/question.jsonl"))
    assert main(["sweep", "--strategies", "greedy"]) == 2
    assert "--prompts" in capsys.readouterr().err
