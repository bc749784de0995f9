"""Sweeps: every prompt x strategy x seed, resumable, failures recorded; and the report (tables + figures).

A prompt file is JSON lines (`{"category": ..., "name": ..., "prompt": ...}`), a Spec-Bench question file
(`{"question_id": ..., "category": ..., "turns": [...]}`: the turns run as one conversation through the chat
template, each answer in the context of the next turn, one run per turn), or plain text (one prompt per
line). A strategy spec lists strategies separated by ';', each with optional parameters:
`greedy; sample:top_p=0.9,temperature=0.8; prompt_lookup:min_ngram=1`. Each run is tagged with its prompt's
category and a sweep key (a hash of model, prompt, strategy, parameters, seed, length, chat), so a sweep that
is started again skips what already finished ok.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import config_dict, make_config


@dataclass(frozen=True)
class PromptItem:
    """A prompt, or a conversation of several user turns (a Spec-Bench question, with its id)."""

    category: str
    name: str
    prompt: str
    turns: tuple[str, ...] = ()
    question_id: int | None = None

    def __post_init__(self) -> None:
        if not self.turns:
            object.__setattr__(self, "turns", (self.prompt,))


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
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise ValueError(f"cannot read the prompt file {path}: {error.strerror}") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("{"):
            items.append(_prompt_item(line, f"{path}:{number}", number))
        else:
            items.append(PromptItem("all", f"p{number}", line.strip()))
    if not items:
        raise ValueError(f"{path} has no prompts")
    return items


def _prompt_item(line: str, where: str, number: int) -> PromptItem:
    try:
        data = json.loads(line)
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
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f'{where}: expected a JSON object with a "prompt" field, or a Spec-Bench question '
                         'with "question_id" and "turns"') from None


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
    """The request of one turn of a cell (tagged with its category, method and sweep key) and its sweep key."""
    item, method = cell.item, cell.method
    request = RunRequest(method.strategy, method.config, item.turns[turn], chat=chat, max_new_tokens=max_new_tokens,
                         seed=cell.seed, history=tuple(history))
    key = sweep_key(model_id, request)
    tags = {"category": item.category, "prompt_name": item.name, "method": method.label, "sweep_key": key}
    if item.question_id is not None:
        tags |= {"question_id": str(item.question_id), "turn": str(turn), "turns": str(len(item.turns))}
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


def write_report(traces: Sequence[Any], out: str | Path, formats: Sequence[str] = ("svg", "pdf", "png")) -> list[Path]:
    """Tables (LaTeX and Markdown) and figures of the given runs into `out`; each table is computed once."""
    from explorer.export import sampling_latex, sampling_markdown, specbench_latex, specbench_markdown
    from explorer.metrics import sampling_table, specbench_table
    from explorer.specbench import answers, baseline_stem, leaderboard_markdown
    from viz.paper import save_figure
    from viz.report import quality_figure, speedup_figure

    if not traces:
        raise ValueError("no runs to report on: run a sweep first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    speed, sampling = specbench_table(traces), sampling_table(traces)
    tables = [("specbench.tex", specbench_latex(speed)), ("specbench.md", specbench_markdown(speed)),
              ("sampling.tex", sampling_latex(sampling)), ("sampling.md", sampling_markdown(sampling))]
    found = answers(traces)
    if found:  # runs over Spec-Bench's questions: its own metrics, per task, and its equality check
        tables.append(("leaderboard.md", leaderboard_markdown(found, baseline_stem(found))))
    written = []
    for name, content in tables:
        (out / name).write_text(content, encoding="utf-8")
        written.append(out / name)
    figures = (("speedup", speedup_figure(speed), "two"), ("quality", quality_figure(sampling), "one"))
    for name, figure, width in figures:
        for fmt in formats:
            written.append(save_figure(figure, out / f"{name}.{fmt}", width=width))
    return written
