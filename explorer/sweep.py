"""Sweeps: every prompt x strategy x seed, resumable, failures recorded; and the report (tables + figures).

A prompt file is JSON lines (`{"category": ..., "name": ..., "prompt": ...}`) or plain text (one prompt per
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
    category: str
    name: str
    prompt: str


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
            try:
                data = json.loads(line)
                items.append(PromptItem(str(data.get("category", "all")), str(data.get("name", f"p{number}")),
                                        str(data["prompt"])))
            except (json.JSONDecodeError, KeyError):
                raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\" field") from None
        else:
            items.append(PromptItem("all", f"p{number}", line.strip()))
    if not items:
        raise ValueError(f"{path} has no prompts")
    return items


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
    """What makes two runs the same sweep cell: model, prompt, strategy, config, seed, length and chat."""
    raw = json.dumps([model_id, request.prompt, request.strategy, config_dict(request.config), request.seed,
                      request.max_new_tokens, request.chat], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def run_sweep(model: Any, items: Sequence[PromptItem], methods: Sequence[MethodSpec], seeds: int, store: Any, *,
              max_new_tokens: int = 64, chat: bool | None = None,
              progress: Callable[[str], None] | None = None) -> SweepReport:
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    cells = []
    for item in items:
        for method in methods:
            for seed in range(seeds):
                request = RunRequest(method.strategy, method.config, item.prompt, chat=chat,
                                     max_new_tokens=max_new_tokens, seed=seed)
                key = sweep_key(model.info.model_id, request)
                tags = {"category": item.category, "prompt_name": item.name, "method": method.label, "sweep_key": key}
                cells.append((f"{item.name} / {method.label} / seed {seed}", request.replace(tags=tags), key))
    finished = store.completed_sweep_keys([key for _, _, key in cells])
    report = SweepReport()
    for what, request, key in cells:
        if key in finished:
            report.skipped += 1
        else:
            try:
                run_to_end(model, request, recorder=Recorder(store))
                report.done += 1
            except Exception as error:  # stored as failed by the runner; report it at the end and go on
                report.failed.append((what, f"{type(error).__name__}: {error}"))
        if progress is not None:
            progress(what)
    return report


def write_report(traces: Sequence[Any], out: str | Path, formats: Sequence[str] = ("svg", "pdf", "png")) -> list[Path]:
    """Tables (LaTeX and Markdown) and figures of the given runs into `out`; each table is computed once."""
    from explorer.export import sampling_latex, sampling_markdown, specbench_latex, specbench_markdown
    from explorer.metrics import sampling_table, specbench_table
    from viz.paper import save_figure
    from viz.report import quality_figure, speedup_figure

    if not traces:
        raise ValueError("no runs to report on: run a sweep first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    speed, sampling = specbench_table(traces), sampling_table(traces)
    written = []
    for name, content in (("specbench.tex", specbench_latex(speed)), ("specbench.md", specbench_markdown(speed)),
                          ("sampling.tex", sampling_latex(sampling)), ("sampling.md", sampling_markdown(sampling))):
        (out / name).write_text(content, encoding="utf-8")
        written.append(out / name)
    figures = (("speedup", speedup_figure(speed), "two"), ("quality", quality_figure(sampling), "one"))
    for name, figure, width in figures:
        for fmt in formats:
            written.append(save_figure(figure, out / f"{name}.{fmt}", width=width))
    return written
