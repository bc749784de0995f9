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


def run_sweep(model: Any, items: Sequence[PromptItem], methods: Sequence[MethodSpec], seeds: int, store: Any, *,
              max_new_tokens: int = 64, chat: bool | None = None,
              progress: Callable[[str], None] | None = None) -> SweepReport:
    """Run every item x method x seed into `store`, skipping runs that already finished ok (by sweep key). A
    conversation's turns run in order, each with the earlier answers as its history; a failed turn ends it."""
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if chat is False and any(len(item.turns) > 1 for item in items):
        raise ValueError("multi-turn questions run through the chat template: drop --no-chat")
    report = SweepReport()
    for item in items:
        for method in methods:
            for seed in range(seeds):
                what = f"{item.name} / {method.label} / seed {seed}"
                try:
                    done = _run_conversation(model, item, method, seed, store, max_new_tokens, chat)
                    report.done += done
                    report.skipped += len(item.turns) - done
                except Exception as error:  # stored as failed by the runner; report it at the end and go on
                    report.failed.append((what, f"{type(error).__name__}: {error}"))
                if progress is not None:
                    progress(what)
    return report


def _run_conversation(model: Any, item: PromptItem, method: MethodSpec, seed: int, store: Any,
                      max_new_tokens: int, chat: bool | None) -> int:
    """Run (or find, when already stored) each turn of one item; return how many runs were new."""
    history: list[tuple[str, str]] = []
    new_runs = 0
    for turn, prompt in enumerate(item.turns):
        request = RunRequest(method.strategy, method.config, prompt, chat=chat, max_new_tokens=max_new_tokens,
                             seed=seed, history=tuple(history))
        key = sweep_key(model.info.model_id, request)
        tags = {"category": item.category, "prompt_name": item.name, "method": method.label, "sweep_key": key}
        if item.question_id is not None:
            tags |= {"question_id": str(item.question_id), "turn": str(turn), "turns": str(len(item.turns))}
        stored = store.completed_sweep_keys([key])
        if key in stored:
            answer = store.load_trace(stored[key]).text
        else:
            answer = run_to_end(model, request.replace(tags=tags), recorder=Recorder(store)).text
            new_runs += 1
        history.append((prompt, answer.strip()))
    return new_runs


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
