"""Spec-Bench, as Spec-Bench computes it (Xia et al. 2024, "Unlocking Efficiency in Large Language Model
Inference: A Comprehensive Survey of Speculative Decoding", ACL Findings; github.com/hemingkx/Spec-Bench).

Runs of a sweep over Spec-Bench's question file carry the tags `question_id`, `turn` and `turns`. From them:
- `answers(traces)`: one answer per question and method in Spec-Bench's answer format (`question_id`,
  `category`, `answer_id`, `model_id`, `choices` = one per seed with per-turn `turns` texts, `decoding_steps`,
  `new_tokens`, `wall_time`, and `accept_lengths` of every verification round of every turn, `tstamp`);
  `write_answers` writes them as one `MODEL-METHOD.jsonl` file per method, which Spec-Bench's own
  evaluation/speed.py and equal.py read unchanged.
- `speed_table`: what its speed script prints per task (mt_bench = its eight MT-bench categories, translation,
  summarization, qa, math_reasoning, rag, overall): mean accepted tokens = the mean of all accept lengths;
  tokens/s = the mean over questions of sum(new_tokens) / sum(wall_time) of the first choice; speedup = that
  mean over the baseline's.
  Departure: Spec-Bench counts the baseline's tokens by re-tokenising its answer text; we take the baseline's
  recorded new_tokens (the same count for a greedy run that ends at EOS or the length limit, without loading a
  tokenizer here).
- `equality`: its equal.py check (every turn's text identical to the baseline's), question by question, naming
  the first question that differs.
Plain list code: no torch.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from explorer.events import DraftRound, TokenStep
from explorer.metrics import method_label
from explorer.trace import Trace

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag", "overall")
DEFAULT_QUESTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "spec_bench" / "question.jsonl"


def default_question_file() -> Path | None:
    """../shared/spec_bench/question.jsonl beside the repository, when it is there."""
    return DEFAULT_QUESTIONS if DEFAULT_QUESTIONS.is_file() else None


def accept_lengths(trace: Trace) -> list[int]:
    """Tokens committed by each verification step, in order: accepted drafts + 1 for a draft round, 1 for a
    plain step. A round cut short by a stop condition counts only the tokens it committed. They sum to the
    run's new tokens, and their mean is `Trace.mean_accepted_tokens`. An imported run: as its record gives them."""
    record = trace.engine_record
    if record is not None:
        return [a + 1 for a in record.per_step_accepted]
    lengths: list[int] = []
    round_end = -1  # the last position committed by the current round
    for event in trace.events:
        if isinstance(event, DraftRound):
            lengths.append(0)
            round_end = event.position + event.accepted_count
        elif isinstance(event, TokenStep):
            if lengths and event.position <= round_end and event.origin != "plain":
                lengths[-1] += 1
            else:
                lengths.append(1)
    return [n for n in lengths if n]


def task_of(category: str) -> str:
    return "mt_bench" if category in MT_BENCH else category


def file_stem(model_id: str, method: str) -> str:
    """`MODEL-METHOD`, as Spec-Bench names its answer files (characters outside [A-Za-z0-9._=-] become '_')."""
    model = model_id.split(":", 1)[-1].rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{model}-{method}").strip("_")


def answers(traces: Iterable[Trace]) -> dict[str, list[dict[str, Any]]]:
    """{file stem: answers, sorted by question id} from the finished turns of Spec-Bench sweeps. A question
    appears only with all its turns finished ok; one choice per seed (index = seed)."""
    turns: dict[tuple[str, int, int], dict[int, Trace]] = defaultdict(dict)
    stems: dict[tuple[str, int, int], str] = {}
    for trace in traces:
        tags = trace.started.tags
        if trace.status != "ok" or "question_id" not in tags:
            continue
        key = (method_label(trace), int(tags["question_id"]), trace.started.seed)
        turns[key][int(tags["turn"])] = trace
        stems[key] = file_stem(trace.started.model_id, method_label(trace))
    grouped: dict[str, dict[int, list[tuple[int, list[Trace]]]]] = defaultdict(lambda: defaultdict(list))
    for (method, question, seed), by_turn in turns.items():
        expected = int(next(iter(by_turn.values())).started.tags["turns"])
        if sorted(by_turn) != list(range(expected)):
            continue  # an unfinished conversation
        grouped[stems[method, question, seed]][question].append((seed, [by_turn[t] for t in range(expected)]))
    out: dict[str, list[dict[str, Any]]] = {}
    for stem, questions in sorted(grouped.items()):
        out[stem] = [_answer(stem, question, sorted(choices)) for question, choices in sorted(questions.items())]
    return out


def _answer(stem: str, question: int, choices: list[tuple[int, list[Trace]]]) -> dict[str, Any]:
    first = choices[0][1][0]
    return {
        "question_id": question,
        "category": first.started.tags["category"],
        "answer_id": first.run_id,
        "model_id": stem,
        "choices": [{
            "index": seed,
            "turns": [t.text.strip() for t in conversation],
            "decoding_steps": [len(accept_lengths(t)) for t in conversation],
            "new_tokens": [t.new_tokens for t in conversation],
            "wall_time": [t.finished.wall_time_s for t in conversation],
            "accept_lengths": [n for t in conversation for n in accept_lengths(t)],
        } for seed, conversation in choices],
        "tstamp": datetime.fromisoformat(first.started.created_at).timestamp(),
    }


def write_answers(traces: Iterable[Trace], out: str | Path) -> list[Path]:
    """One `MODEL-METHOD.jsonl` answer file per method in `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: give a directory for the Spec-Bench answer files")
    found = answers(traces)
    if not found:
        raise ValueError("no finished Spec-Bench runs among these: run `sweep` on a Spec-Bench question file first")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, rows in found.items():
        path = out / f"{stem}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class TaskSpeed:
    mean_accepted_tokens: float
    tokens_per_s: float
    speedup: float
    questions: int


def _in_task(answer: dict[str, Any], task: str) -> bool:
    return task == "overall" or task_of(answer["category"]) == task


def _speeds(rows: Sequence[dict[str, Any]]) -> list[float]:
    return [sum(r["choices"][0]["new_tokens"]) / sum(r["choices"][0]["wall_time"]) for r in rows]


def speed_table(method_answers: Sequence[dict[str, Any]], baseline_answers: Sequence[dict[str, Any]]
                ) -> dict[str, TaskSpeed]:
    """Per task: Spec-Bench's speed-script numbers for one method against the baseline's answers."""
    table = {}
    for task in TASKS:
        rows = [a for a in method_answers if _in_task(a, task)]
        base = [a for a in baseline_answers if _in_task(a, task)]
        if not rows:
            continue
        lengths = [n for r in rows for n in r["choices"][0]["accept_lengths"]]
        speed = statistics.fmean(_speeds(rows))
        base_speed = statistics.fmean(_speeds(base)) if base else float("nan")
        table[task] = TaskSpeed(statistics.fmean(lengths) if lengths else float("nan"), speed,
                                speed / base_speed, len(rows))
    return table


def equality(method_answers: Sequence[dict[str, Any]], baseline_answers: Sequence[dict[str, Any]]
             ) -> tuple[bool, int | None]:
    """(every question's turns equal the baseline's, the first question id that differs or is missing)."""
    base = {a["question_id"]: a["choices"][0]["turns"] for a in baseline_answers}
    for answer in sorted(method_answers, key=lambda a: a["question_id"]):
        if base.get(answer["question_id"]) != answer["choices"][0]["turns"]:
            return False, answer["question_id"]
    return True, None


def leaderboard(found: dict[str, list[dict[str, Any]]], baseline: str) -> dict[str, dict[str, TaskSpeed]]:
    """{file stem: {task: TaskSpeed}} for every method, against the baseline method's file stem."""
    if baseline not in found:
        raise ValueError(f"no baseline answers {baseline!r}: run greedy in the same sweep")
    return {stem: speed_table(rows, found[baseline]) for stem, rows in found.items()}


def leaderboard_markdown(found: dict[str, list[dict[str, Any]]], baseline: str) -> str:
    """Spec-Bench's leaderboard layout: per task speedup and mean accepted tokens, overall, equality."""
    board = leaderboard(found, baseline)
    tasks = [t for t in TASKS if any(t in per for per in board.values())]
    lines = ["| method | " + " | ".join(f"{t}: speedup, MAT" for t in tasks) + " | tok/s | equal to baseline |",
             "|---|" + "---:|" * len(tasks) + "---:|---|"]
    for stem, per in board.items():
        cells = [f"{_number(per[t].speedup, 'x')}, {_number(per[t].mean_accepted_tokens)}" if t in per else "–"
                 for t in tasks]
        same, first = equality(found[stem], found[baseline])
        overall = per.get("overall")
        lines.append(f"| {stem} | " + " | ".join(cells) + f" | {overall.tokens_per_s:.1f} | "
                     + ("yes" if same else f"no (question {first})") + " |")
    return "\n".join(lines) + "\n"


def _number(value: float, suffix: str = "") -> str:
    return f"{value:.2f}{suffix}" if math.isfinite(value) else "–"


def baseline_stem(found: dict[str, list[dict[str, Any]]], baseline_method: str = "greedy") -> str:
    """The file stem of the baseline method's answers."""
    for stem in found:
        if stem.endswith(f"-{baseline_method}"):
            return stem
    raise ValueError(f"no {baseline_method} answers among the Spec-Bench runs: add {baseline_method} to the sweep")
