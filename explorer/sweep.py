"""Sweeps: every prompt x strategy x seed, resumable, failures recorded; and the report (tables + figures).

A prompt file is JSON lines (`{"category": ..., "name": ..., "prompt": ...}`), a Spec-Bench question file
(`{"question_id": ..., "category": ..., "turns": [...]}`: the turns run as one conversation through the chat
template, each answer in the context of the next turn, one run per turn), SPEED-Bench's questions (NVIDIA,
Hub dataset nvidia/SPEED-Bench: `question_id` (a string), `category`, `sub_category`, `turns`, `source`,
`src_id`, `difficulty`, `multiturn`; as JSON lines or a local copy of one of its Parquet files, its turns
resolved by its own prepare step: the Hub copy ships a placeholder for most prompts), or plain text (one prompt
per line). A strategy spec lists strategies separated by ';', each with optional parameters:
`greedy; sample:top_p=0.9,temperature=0.8; prompt_lookup:min_ngram=1`. Each run is tagged with its prompt's
category and a sweep key (a hash of model, prompt, strategy, parameters, seed, length, chat), so a sweep that
is started again skips what already finished ok; a SPEED-Bench question's run also with its id
(`speed_bench_id`), `sub_category`, `difficulty`, `source` and `src_id`, so that reports group by them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explorer.paths import read_lines
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import REGISTRY, config_dict, make_config

# SPEED-Bench's question fields (its Hub dataset card): the ones only it has tell its records from Spec-Bench's.
SPEED_BENCH_ONLY = ("sub_category", "source", "src_id", "difficulty", "multiturn")
SPEED_BENCH_TAGS = ("sub_category", "difficulty", "source", "src_id")  # kept on every run of the question
SPEED_BENCH_ID = "speed_bench_id"  # its question id is a string: a tag of its own (Spec-Bench's int: question_id)
# What the Hub copy has in place of the prompts its license does not let it ship (specdec_bench's prepare step
# fetches them from their sources).
SPEED_BENCH_PLACEHOLDER = "FULL BENCHMARK DATA SHOULD BE FETCHED FROM THE SOURCE"


@dataclass(frozen=True)
class PromptItem:
    """A prompt, or a conversation of several user turns (a Spec-Bench question, with its id; a SPEED-Bench
    question, its string id and its own fields in `tags`, which every run of it carries)."""

    category: str
    name: str
    prompt: str
    turns: tuple[str, ...] = ()
    question_id: int | None = None
    tags: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.turns:
            object.__setattr__(self, "turns", (self.prompt,))

    @property
    def is_question(self) -> bool:
        """A benchmark question: its runs say which of its turns each one is."""
        return self.question_id is not None or SPEED_BENCH_ID in self.tags


@dataclass(frozen=True)
class MethodSpec:
    label: str
    strategy: str
    params: dict[str, str]
    config: Any  # the validated config the params make


@dataclass
class SweepReport:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (what, error)


def load_prompts(path: str | Path) -> list[PromptItem]:
    """The prompts of a JSON-lines, plain-text or (SPEED-Bench's local copy) Parquet file, in file order; a bad
    record is refused with one line naming the file, its line (or row) and what is wrong."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        items = [_record_item(row, f"{path}:row {number}", number)
                 for number, row in enumerate(_parquet_rows(path), start=1)]
        if not items:
            raise ValueError(f"{path} has no prompts")
        return items
    lines = [line for line in read_lines(path, "prompt file", "JSON lines, plain text or .parquet") if line.strip()]
    items = []
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("{"):
            items.append(_prompt_item(line, f"{path}:{number}", number))
        else:
            items.append(PromptItem("all", f"p{number}", line.strip()))
    if not items:
        raise ValueError(f"{path} has no prompts")
    return items


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # a missing file; pyarrow's ArrowInvalid (not Parquet) is a ValueError
        raise ValueError(f"cannot read {path} as Parquet: {str(error).splitlines()[0][:200]}") from None


def _prompt_item(line: str, where: str, number: int) -> PromptItem:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        data = None
    return _record_item(data, where, number)


def _record_item(data: Any, where: str, number: int) -> PromptItem:
    """One record: a prompt, a Spec-Bench question, or a SPEED-Bench question (its own fields, or a string id)."""
    string_id = isinstance(data, dict) and isinstance(data.get("question_id"), str) and not (
        data["question_id"].strip().isdigit())
    if isinstance(data, dict) and "turns" in data and (string_id or any(key in data for key in SPEED_BENCH_ONLY)):
        return _speed_bench_item(data, where)
    try:
        if not isinstance(data, dict):
            raise ValueError
        category = str(data.get("category", "all"))
        if "turns" in data:  # a Spec-Bench question
            turns = tuple(str(turn) for turn in data["turns"])
            question_id = int(data["question_id"])
            if not turns:
                raise ValueError
            return PromptItem(category, f"q{question_id}", turns[0], turns, question_id)
        return PromptItem(category, str(data.get("name", f"p{number}")), str(data["prompt"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f'{where}: expected a JSON object with a "prompt" field, or a Spec-Bench question '
                         'with "question_id" and "turns"') from None


def _speed_bench_item(data: dict[str, Any], where: str) -> PromptItem:
    """A SPEED-Bench question: its turns run as one conversation, like Spec-Bench's (an empty turn is dropped,
    as AIPerf's SPEED-Bench loader drops it); its string id names the item and is kept in the tags with its
    sub_category, difficulty, source and src_id."""
    missing = [key for key in ("question_id", "category", "turns") if data.get(key) in (None, "", [])]
    if missing:
        raise ValueError(f"{where}: a SPEED-Bench question needs {', '.join(missing)}: "
                         f"this record has no {' and no '.join(missing)}")
    turns = data["turns"]
    if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
        raise ValueError(f"{where}: a SPEED-Bench question's turns must be a list of strings")
    turns = [turn for turn in turns if turn.strip()]
    question_id = str(data["question_id"]).strip()
    if not turns:
        raise ValueError(f"{where}: SPEED-Bench question {question_id} has only empty turns")
    if any(turn.startswith(SPEED_BENCH_PLACEHOLDER) for turn in turns):
        raise ValueError(f"{where}: SPEED-Bench question {question_id} holds the Hub copy's placeholder, not its "
                         "prompt: resolve the turns first (specdec_bench's prepare_data.py, NVIDIA Model-Optimizer)")
    if not isinstance(data.get("multiturn", False), bool):
        raise ValueError(f"{where}: a SPEED-Bench question's multiturn must be true or false")
    tags = {SPEED_BENCH_ID: question_id}
    tags |= {key: str(data[key]) for key in SPEED_BENCH_TAGS if data.get(key) not in (None, "")}
    return PromptItem(str(data["category"]), question_id, turns[0], tuple(turns), tags=tags)


def task_items(task: Any) -> list[PromptItem]:
    """An explorer.tasks.Task's items as prompts, in the task's category, each run tagged with the task, item,
    checker and reference (explorer.tasks.item_tags) so that the report checks it from the stored run alone."""
    from explorer.tasks import item_tags

    return [PromptItem(task.name, item.id, item.prompt, tags=item_tags(task, item)) for item in task.items]


def per_category(items: Sequence[PromptItem], count: int) -> list[PromptItem]:
    """A stratified subset: the first `count` items of each category, in file order."""
    if count < 1:
        raise ValueError("--per-category must be >= 1")
    taken: dict[str, int] = {}
    chosen = []
    for item in items:
        if taken.get(item.category, 0) < count:
            taken[item.category] = taken.get(item.category, 0) + 1
            chosen.append(item)
    return chosen


def parse_strategies(spec: str) -> list[MethodSpec]:
    methods = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, rest = part.partition(":")
        params = {}
        for pair in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"in {part!r}: parameters are key=value, separated by commas")
            params[key.strip()] = value.strip()
        config = make_config(name.strip(), params)  # validate now, not in the middle of the sweep
        label = name.strip() + (f"({','.join(f'{k}={v}' for k, v in params.items())})" if params else "")
        methods.append(MethodSpec(label, name.strip(), params, config))
    if not methods:
        raise ValueError("no strategies given: e.g. --strategies 'greedy; sample:top_p=0.9'")
    return methods


def sweep_key(model_id: str, request: RunRequest) -> str:
    """What makes two runs the same sweep cell: model, prompt, strategy, config, seed, length and chat (and the
    conversation so far, for a later turn)."""
    cell = [model_id, request.prompt, request.strategy, config_dict(request.config), request.seed,
            request.max_new_tokens, request.chat]
    if request.history:
        cell.append([list(turn) for turn in request.history])
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Cell:
    """One cell of the sweep matrix: an item (all its turns) with one method and one seed."""

    item: PromptItem
    method: MethodSpec
    seed: int

    @property
    def what(self) -> str:
        return f"{self.item.name} / {self.method.label} / seed {self.seed}"


def sweep_cells(items: Sequence[PromptItem], methods: Sequence[MethodSpec], seeds: int,
                chat: bool | None = None) -> list[Cell]:
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if chat is False and any(len(item.turns) > 1 for item in items):
        raise ValueError("multi-turn questions run through the chat template: drop --no-chat")
    return [Cell(item, method, seed) for item in items for method in methods for seed in range(seeds)]


def turn_request(model_id: str, cell: Cell, turn: int, history: Sequence[tuple[str, str]], max_new_tokens: int,
                 chat: bool | None) -> tuple[RunRequest, str]:
    """The request of one turn of a cell (tagged with its category, method, sweep key and, for a benchmark's
    question, its id, its fields and the turn) and its sweep key."""
    item, method = cell.item, cell.method
    request = RunRequest(method.strategy, method.config, item.turns[turn], chat=chat, max_new_tokens=max_new_tokens,
                         seed=cell.seed, history=tuple(history))
    key = sweep_key(model_id, request)
    tags = {**item.tags, "category": item.category, "prompt_name": item.name, "method": method.label,
            "sweep_key": key}
    if item.question_id is not None:
        tags["question_id"] = str(item.question_id)
    if item.is_question:
        tags |= {"turn": str(turn), "turns": str(len(item.turns))}
    return request.replace(tags=tags), key


def stored_answers(model_id: str, cell: Cell, store: Any, max_new_tokens: int, chat: bool | None) -> dict[str, str]:
    """{sweep key: answer} of the cell's turns already stored ok, in order up to the first one missing (a later
    turn's key depends on the earlier answers)."""
    known: dict[str, str] = {}
    history: list[tuple[str, str]] = []
    for turn, prompt in enumerate(cell.item.turns):
        _, key = turn_request(model_id, cell, turn, history, max_new_tokens, chat)
        stored = store.completed_sweep_keys([key])
        if key not in stored:
            break
        known[key] = store.load_trace(stored[key]).text
        history.append((prompt, known[key].strip()))
    return known


def run_cell(model: Any, cell: Cell, max_new_tokens: int, chat: bool | None, known: Callable[[str], str | None],
             recorder: Callable[[], Recorder]) -> int:
    """Run each turn of a cell that `known` has no answer for, in order, each with the earlier answers as its
    history (a failed turn raises and ends the cell); return how many runs were new."""
    history: list[tuple[str, str]] = []
    new_runs = 0
    for turn, prompt in enumerate(cell.item.turns):
        request, key = turn_request(model.info.model_id, cell, turn, history, max_new_tokens, chat)
        answer = known(key)
        if answer is None:
            answer = run_to_end(model, request, recorder=recorder()).text
            new_runs += 1
        history.append((prompt, answer.strip()))
    return new_runs


def run_sweep(model: Any, items: Sequence[PromptItem], methods: Sequence[MethodSpec], seeds: int, store: Any, *,
              max_new_tokens: int = 64, chat: bool | None = None,
              progress: Callable[[str], None] | None = None) -> SweepReport:
    """Run every item x method x seed into `store`, skipping runs that already finished ok (by sweep key). A
    conversation's turns run in order, each with the earlier answers as its history; a failed turn ends it."""
    report = SweepReport()
    for cell in sweep_cells(items, methods, seeds, chat):
        try:
            known = stored_answers(model.info.model_id, cell, store, max_new_tokens, chat)
            done = run_cell(model, cell, max_new_tokens, chat, known.get, lambda: Recorder(store))
            report.done += done
            report.skipped += len(cell.item.turns) - done
        except Exception as error:  # stored as failed by the runner; report it at the end and go on
            report.failed.append((cell.what, f"{type(error).__name__}: {error}"))
        if progress is not None:
            progress(cell.what)
    return report


def samplers() -> frozenset[str]:
    """The sampling family's strategies (the diversity-vs-quality figure draws those), plugins' included."""
    return frozenset(name for name, spec in REGISTRY.items() if spec.family == "sampling")


def write_report(traces: Sequence[Any], out: str | Path, formats: Sequence[str] = ("svg", "pdf", "png"), *,
                 reference_texts: Sequence[str] | None = None, model: Any = None) -> list[Path]:
    """Tables (LaTeX and Markdown) and figures of the given runs into `out`; each table is computed once. Where
    any run drafted: SPEED-Bench's per-category acceptance matrix too (acceptance.md, .tex and a heatmap); where
    runs carry a task (explorer.tasks): accuracy per task and method with its interval (tasks.md, .tex). Always:
    the quality metrics per method with 95 % intervals (quality_metrics.md, .tex), quality vs speed with the
    Pareto front (quality_speed), quality vs compute (quality_compute), and the samplers' diversity vs quality
    across temperatures (diversity_quality)."""
    from explorer.export import (
        acceptance_matrix_latex,
        acceptance_matrix_markdown,
        quality_latex,
        quality_markdown,
        sampling_latex,
        sampling_markdown,
        specbench_latex,
        specbench_markdown,
    )
    from explorer.metrics import acceptance_matrix, quality_table, sampling_table, specbench_table
    from explorer.specbench import answers, baseline_stem, leaderboard_markdown
    from explorer.tasks import task_report, tasks_latex, tasks_markdown
    from viz.paper import save_figure
    from viz.report import (
        acceptance_matrix_figure,
        diversity_quality_figure,
        quality_figure,
        quality_speed_figure,
        speedup_figure,
    )

    if not traces:
        raise ValueError("no runs to report on: run a sweep first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    speed, sampling = specbench_table(traces), sampling_table(traces)
    tables = [("specbench.tex", specbench_latex(speed)), ("specbench.md", specbench_markdown(speed)),
              ("sampling.tex", sampling_latex(sampling)), ("sampling.md", sampling_markdown(sampling))]
    quality = quality_table(traces, reference_texts, model)  # MAUVE per method when references are given
    tables += [("quality_metrics.tex", quality_latex(quality)), ("quality_metrics.md", quality_markdown(quality))]
    acceptance = acceptance_matrix(traces)
    if acceptance[1]:  # some method drafted: its acceptance per category, as SPEED-Bench reports it
        tables += [("acceptance.tex", acceptance_matrix_latex(acceptance)),
                   ("acceptance.md", acceptance_matrix_markdown(acceptance))]
    found = answers(traces)
    if found:  # runs over Spec-Bench's questions: its own metrics, per task, and its equality check
        tables.append(("leaderboard.md", leaderboard_markdown(found, baseline_stem(found))))
    accuracy = task_report(traces)
    if accuracy:  # runs over a checkable task (explorer.tasks): accuracy per method, checked now
        tables += [("tasks.tex", tasks_latex(accuracy)), ("tasks.md", tasks_markdown(accuracy))]
    written = []
    for name, content in tables:
        (out / name).write_text(content, encoding="utf-8")
        written.append(out / name)
    figures = [("speedup", speedup_figure(speed), "two"), ("quality", quality_figure(sampling), "one"),
               ("quality_speed", quality_speed_figure(quality), "two"),
               ("quality_compute", quality_speed_figure(quality, speed="passes_per_token"), "two"),
               ("diversity_quality", diversity_quality_figure(quality, strategies=samplers()), "two")]
    if acceptance[1]:
        figures.append(("acceptance", acceptance_matrix_figure(acceptance), "two"))
    for name, figure, width in figures:
        for fmt in formats:
            written.append(save_figure(figure, out / f"{name}.{fmt}", width=width))
    return written
