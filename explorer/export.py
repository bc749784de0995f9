"""Exports for papers and reviewers: per-step tables (Parquet, CSV), the raw event stream (JSONL), run bundles
(zip: manifest + events) that import into any database, and the metric tables of explorer.metrics written as
LaTeX booktabs and Markdown."""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import zipfile
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from explorer.events import RUN_ID, RunStarted, from_dict, to_dict
from explorer.metrics import AcceptanceMatrix, SamplingTable, SpeedTable
from explorer.trace import Trace
from explorer.trees import node_positions

BUNDLE_FORMAT = "decoding-explorer-bundle/1"
BUNDLE_MAX_BYTES = 64 * 2**20  # uncompressed, manifest and events together
STEP_COLUMNS = [
    "run_id", "strategy", "step", "position", "token_id", "token_text", "logprob", "prob", "rank", "entropy",
    "kept_count", "origin", "round", "draft_p", "draft_q", "draft_u", "verdict",
]


# ------------------------------------------------------------------------------------------ step tables
def step_rows(traces: Iterable[Trace]) -> list[dict[str, Any]]:
    """One row per committed token of every run; draft/verify fields where the token went through a round."""
    rows = []
    for trace in traces:
        verified: dict[int, tuple[int, float | None, float | None, float | None, str]] = {}
        for round_ in trace.rounds:
            positions = node_positions(round_.position, round_.parents)
            for i, verdict in enumerate(round_.verdicts):
                if verdict == "accepted":
                    verified[positions[i]] = (round_.round, round_.p[i], round_.q[i], round_.u[i],
                                                             verdict)
            bonus_position = round_.position + round_.accepted_count
            verified.setdefault(bonus_position, (round_.round, None, None, None, round_.bonus_kind))
        for step in trace.token_steps:
            round_index, p, q, u, verdict = verified.get(step.position, (None, None, None, None, None))
            rows.append({
                "run_id": trace.run_id, "strategy": trace.started.strategy, "step": step.step,
                "position": step.position, "token_id": step.token_id, "token_text": step.token_text,
                "logprob": step.logprob, "prob": math.exp(step.logprob), "rank": step.rank, "entropy": step.entropy,
                "kept_count": step.kept_count, "origin": step.origin, "round": round_index, "draft_p": p,
                "draft_q": q, "draft_u": u, "verdict": verdict,
            })
    return rows


def write_csv(traces: Iterable[Trace], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=STEP_COLUMNS)
        writer.writeheader()
        writer.writerows(step_rows(traces))
    return path


def lens_rows(traces: Iterable[Trace]) -> list[dict[str, Any]]:
    """One row per (step, layer) of every run that recorded the logit lens."""
    rows = []
    for trace in traces:
        for record in (e for e in trace.events if e.kind == "lens_step"):
            for layer, (prob, rank) in enumerate(zip(record.chosen_probs, record.chosen_ranks, strict=True)):
                rows.append({"run_id": trace.run_id, "step": record.step, "position": record.position,
                             "token_id": record.token_id, "layer": layer, "chosen_prob": prob, "chosen_rank": rank,
                             "top1_id": record.top_ids[layer][0], "top1_text": record.top_texts[layer][0],
                             "top1_prob": record.top_probs[layer][0]})
    return rows


def attention_rows(traces: Iterable[Trace]) -> list[dict[str, Any]]:
    """One row per (step, attended position) of every run that recorded attention."""
    rows = []
    for trace in traces:
        for record in (e for e in trace.events if e.kind == "attention_step"):
            for rank, (source, weight) in enumerate(zip(record.sources, record.weights, strict=True)):
                rows.append({"run_id": trace.run_id, "step": record.step, "position": record.position,
                             "token_id": record.token_id, "rank": rank, "source_position": source,
                             "weight": weight, "first_layer": record.first_layer, "last_layer": record.last_layer})
    return rows


def unmask_rows(traces: Iterable[Trace]) -> list[dict[str, Any]]:
    """One row per (denoising step, position masked before it) of every diffusion run: its proposal and scores
    then, and whether the step committed it (and to which token)."""
    rows = []
    for trace in traces:
        for record in (e for e in trace.events if e.kind == "unmask_step"):
            committed = dict(zip(record.committed, record.committed_ids, strict=True))
            for index, position in enumerate(record.masked):
                rows.append({"run_id": trace.run_id, "step": record.step, "position": position,
                             "block_start": record.block_start, "block_end": record.block_end,
                             "predicted_id": record.predicted_ids[index], "confidence": record.confidences[index],
                             "margin": record.margins[index], "entropy": record.entropies[index],
                             "score": record.scores[index] if record.scores else None,
                             "committed": position in committed, "committed_id": committed.get(position),
                             "all_in": record.all_in})
    return rows


UNMASK_SCHEMA = [("run_id", "string"), ("step", "int64"), ("position", "int64"), ("block_start", "int64"),
                 ("block_end", "int64"), ("predicted_id", "int64"), ("confidence", "float64"), ("margin", "float64"),
                 ("entropy", "float64"), ("score", "float64"), ("committed", "bool_"), ("committed_id", "int64"),
                 ("all_in", "bool_")]
LENS_SCHEMA = [("run_id", "string"), ("step", "int64"), ("position", "int64"), ("token_id", "int64"),
               ("layer", "int64"), ("chosen_prob", "float64"), ("chosen_rank", "int64"), ("top1_id", "int64"),
               ("top1_text", "string"), ("top1_prob", "float64")]
ATTENTION_SCHEMA = [("run_id", "string"), ("step", "int64"), ("position", "int64"), ("token_id", "int64"),
                    ("rank", "int64"), ("source_position", "int64"), ("weight", "float64"),
                    ("first_layer", "int64"), ("last_layer", "int64")]


def _write_rows_parquet(rows: list[dict[str, Any]], columns: list[tuple[str, str]], path: str | Path) -> Path:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ValueError("Parquet export needs pyarrow: pip install pyarrow") from error
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in columns])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), Path(path))
    return Path(path)


def write_lens_parquet(traces: Iterable[Trace], path: str | Path) -> Path:
    return _write_rows_parquet(lens_rows(traces), LENS_SCHEMA, path)


def write_attention_parquet(traces: Iterable[Trace], path: str | Path) -> Path:
    return _write_rows_parquet(attention_rows(traces), ATTENTION_SCHEMA, path)


def write_unmask_parquet(traces: Iterable[Trace], path: str | Path) -> Path:
    return _write_rows_parquet(unmask_rows(traces), UNMASK_SCHEMA, path)


STEP_SCHEMA = [("run_id", "string"), ("strategy", "string"), ("step", "int64"), ("position", "int64"),
               ("token_id", "int64"), ("token_text", "string"), ("logprob", "float64"), ("prob", "float64"),
               ("rank", "int64"), ("entropy", "float64"), ("kept_count", "int64"), ("origin", "string"),
               ("round", "int64"), ("draft_p", "float64"), ("draft_q", "float64"), ("draft_u", "float64"),
               ("verdict", "string")]


def write_parquet(traces: Iterable[Trace], path: str | Path) -> Path:
    return _write_rows_parquet(step_rows(traces), STEP_SCHEMA, path)


def event_lines(traces: Iterable[Trace]) -> Iterable[str]:
    for trace in traces:
        for seq, event in enumerate(trace.all_events()):
            yield json.dumps({"run_id": trace.run_id, "seq": seq, "kind": event.kind, **to_dict(event)},
                             ensure_ascii=False, allow_nan=True)


def write_jsonl(traces: Iterable[Trace], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as handle:
        for line in event_lines(traces):
            handle.write(line + "\n")
    return path


def read_jsonl(lines: Iterable[str]) -> list[Trace]:
    """Traces back from an event stream written by `write_jsonl` (or a bundle's events.jsonl)."""
    traces: dict[str, Trace] = {}
    for line in lines:
        if not line.strip():
            continue
        data = json.loads(line)
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str) or "kind" not in data:
            raise ValueError("every event line must be a JSON object with a run_id and a kind")
        run_id, kind = data.pop("run_id"), data.pop("kind")
        data.pop("seq", None)
        if kind == RunStarted.kind:
            data["run_id"] = run_id  # a field of the event itself, also used as the line's key
        event = from_dict(kind, data, strict=True)
        if isinstance(event, RunStarted):
            traces[run_id] = Trace(event)
        elif run_id not in traces:
            raise ValueError(f"event stream for run {run_id} does not start with its run_started event")
        else:
            traces[run_id].add(event)
    return list(traces.values())


# -------------------------------------------------------------------------------------------- bundles
def manifest(trace: Trace) -> dict[str, Any]:
    started = trace.started
    return {
        "format": BUNDLE_FORMAT, "run_id": trace.run_id, "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_id": started.model_id, "weights_hash": started.weights_hash, "dtype": started.dtype,
        "device": started.device, "versions": started.versions, "seed": started.seed, "strategy": started.strategy,
        "config": started.config, "prompt": started.prompt, "chat": started.chat,
        "system_prompt": started.system_prompt, "max_new_tokens": started.max_new_tokens, "status": trace.status,
        "reproduce": reproduce_command(trace),
    }


def reproduce_command(trace: Trace) -> str:
    """A shell command that reruns the run as it is (quoted for POSIX shells). A later turn of a conversation
    also needs its earlier turns, which the command line cannot take: the command says so."""
    started = trace.started
    model = "embedded" if started.model_id.startswith("embedded") else started.model_id
    words = ["python", "-m", "explorer", "run", "--strategy", started.strategy, "--model", model]
    for key, value in started.config.items():
        words += ["--param", f"{key}={value}"]
    words += ["--seed", str(started.seed), "--max-new-tokens", str(started.max_new_tokens),
              "--chat" if started.chat else "--no-chat", "--prompt", started.prompt]
    if started.system_prompt:
        words += ["--system", started.system_prompt]
    for stop in started.stop_strings:
        words += ["--stop", stop]
    command = shlex.join(words)
    return command + ("  # turn of a conversation: the earlier turns are in the bundle" if started.history else "")


def safe_name(run_id: str) -> str:
    """A file name for a run: its id when it is one this program writes, else the id with every character
    outside [A-Za-z0-9_-] replaced (so that no stored id can lead a path out of its folder)."""
    return run_id if RUN_ID.fullmatch(run_id) else re.sub(r"[^A-Za-z0-9_-]", "_", run_id)[:64] or "run"


def write_bundle(trace: Trace, path: str | Path) -> Path:
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("manifest.json", json.dumps(manifest(trace), indent=2, ensure_ascii=False))
        bundle.writestr("events.jsonl", "\n".join(event_lines([trace])) + "\n")
    return path


def _read_entry(bundle: zipfile.ZipFile, name: str, budget: int) -> bytes:
    """An entry's bytes, refusing more than `budget` whatever its header claims (zip bombs)."""
    with bundle.open(name) as entry:
        data = entry.read(budget + 1)
    if len(data) > budget:
        raise ValueError(f"{name} is larger than the {BUNDLE_MAX_BYTES // 2**20} MiB a bundle may hold")
    return data


def read_bundle(path: str | Path) -> Trace:
    """A run bundle, checked whole before anything is written: exactly manifest.json and events.jsonl, at most
    BUNDLE_MAX_BYTES uncompressed, every event of a known kind with fields of the right types, one run whose id
    matches the manifest. Anything else is refused with one line."""
    not_bundle = f"{path} is not a run bundle (a zip with manifest.json and events.jsonl)"
    try:
        with zipfile.ZipFile(path) as bundle:
            names = sorted(bundle.namelist())
            if names != ["events.jsonl", "manifest.json"]:
                raise ValueError(f"{not_bundle}: it holds {len(names)} entries")
            manifest_bytes = _read_entry(bundle, "manifest.json", BUNDLE_MAX_BYTES)
            events_bytes = _read_entry(bundle, "events.jsonl", BUNDLE_MAX_BYTES - len(manifest_bytes))
        meta = json.loads(manifest_bytes)
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: manifest.json is not a JSON object")
        if meta.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{path} has bundle format {str(meta.get('format'))[:40]!r}; this program reads "
                             f"{BUNDLE_FORMAT}")
        traces = read_jsonl(events_bytes.decode("utf-8").splitlines())
    except ValueError as error:
        raise ValueError(str(error) if str(path) in str(error) else f"{path}: {error}") from None
    except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as error:
        # RuntimeError: encrypted entries; NotImplementedError: unknown compression; RecursionError (a
        # RuntimeError too): JSON nested too deeply
        raise ValueError(f"{not_bundle}: {type(error).__name__}") from None
    if len(traces) != 1 or traces[0].run_id != meta.get("run_id"):
        raise ValueError(f"{path}: the events do not match the manifest's run {str(meta.get('run_id'))[:40]}")
    return traces[0]


# --------------------------------------------------------------------------------------- metric tables
def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "--" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def latex_escape(text: str) -> str:
    for char, replacement in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                              ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
                              ("^", r"\textasciicircum{}")):
        text = text.replace(char, replacement)
    return text


def specbench_latex(speed: SpeedTable) -> str:
    categories, table = speed
    columns = "l" + "rr" * len(categories)
    head = " & ".join(rf"\multicolumn{{2}}{{c}}{{{latex_escape(c)}}}" for c in categories)
    sub = " & ".join(["speedup & MAT"] * len(categories))
    lines = [rf"\begin{{tabular}}{{{columns}}}", r"\toprule", f"Method & {head} " + r"\\",
             f" & {sub} " + r"\\", r"\midrule"]
    times = r"$\times$"
    for method, per in table.items():
        missing = (math.nan, math.nan)
        cells = [_fmt(per.get(c, missing)[0], ".2f", times) + " & " + _fmt(per.get(c, missing)[1], ".2f")
                 for c in categories]
        lines.append(latex_escape(method) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def specbench_markdown(speed: SpeedTable) -> str:
    categories, table = speed
    lines = ["| method | " + " | ".join(f"{c}: speedup, MAT" for c in categories) + " |",
             "|---|" + "---:|" * len(categories)]
    for method, per in table.items():
        cells = [f"{_fmt(per.get(c, (math.nan, math.nan))[0], '.2f', 'x')}, "
                 f"{_fmt(per.get(c, (math.nan, math.nan))[1], '.2f')}" for c in categories]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def acceptance_matrix_latex(matrix: AcceptanceMatrix) -> str:
    """SPEED-Bench's matrix: per method and category, vLLM's mean acceptance length (bonus included) and, in
    brackets, the draft acceptance rate, pooled over the runs (explorer.metrics.acceptance_matrix)."""
    categories, table = matrix
    percent = r"\%"
    lines = [rf"\begin{{tabular}}{{l{'r' * len(categories)}}}", r"\toprule",
             "Method & " + " & ".join(latex_escape(c) for c in categories) + r" \\",
             " & " + " & ".join([r"MAL (accept \%)"] * len(categories)) + r" \\", r"\midrule"]
    for method, per in table.items():
        cells = [f"{_fmt(per[c].mean_acceptance_length, '.2f')} ({_rate(per[c].draft_acceptance_rate, percent)})"
                 if c in per else "--" for c in categories]
        lines.append(latex_escape(method) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def acceptance_matrix_markdown(matrix: AcceptanceMatrix) -> str:
    categories, table = matrix
    lines = ["| method | " + " | ".join(f"{c}: MAL, accept %, runs" for c in categories) + " |",
             "|---|" + "---:|" * len(categories)]
    for method, per in table.items():
        cells = [f"{_fmt(per[c].mean_acceptance_length, '.2f')}, {_rate(per[c].draft_acceptance_rate, '%')}, "
                 f"{per[c].runs}" if c in per else "--" for c in categories]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _rate(value: float | None, percent: str) -> str:
    return _fmt(None if value is None else 100 * value, ".1f", percent)


SAMPLING_COLUMNS = [("runs", "runs", "d"), ("entropy", "mean entropy", ".3f"), ("perplexity", "perplexity", ".2f"),
                    ("repetition", "rep-4", ".3f"), ("distinct_2", "distinct-2", ".3f")]


def sampling_latex(table: SamplingTable) -> str:
    lines = [r"\begin{tabular}{l" + "r" * len(SAMPLING_COLUMNS) + "}", r"\toprule",
             "Method & " + " & ".join(title for _, title, _ in SAMPLING_COLUMNS) + r" \\", r"\midrule"]
    for method, values in table.items():
        lines.append(latex_escape(method) + " & "
                     + " & ".join(_fmt(values[key], spec) for key, _, spec in SAMPLING_COLUMNS) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def sampling_markdown(table: SamplingTable) -> str:
    lines = ["| method | " + " | ".join(title for _, title, _ in SAMPLING_COLUMNS) + " |",
             "|---|" + "---:|" * len(SAMPLING_COLUMNS)]
    for method, values in table.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(values[key], spec) for key, _, spec in SAMPLING_COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"


QUALITY_COLUMNS = [("runs", "runs", "d"), ("distinct_2", "distinct-2", ".3f"), ("distinct_4", "distinct-4", ".3f"),
                   ("rep_4", "rep-4", ".3f"), ("diversity", "diversity", ".3f"),
                   ("ngram_entropy", "Ent-4", ".2f"), ("coherence", "coherence", ".3f"),
                   ("perplexity", "perplexity", ".2f"), ("self_bleu_4", "self-BLEU-4", ".3f"),
                   ("mauve", "MAUVE", ".3f"),
                   ("tokens_per_s", "tok/s", ".1f"), ("passes_per_token", "passes / token", ".2f")]


def _interval_cell(value: Any, spec: str, plus_minus: str = "±") -> str:
    """A (mean, low, high) as 'mean ± half-width' (the 95 % interval over runs); a number as it is."""
    if isinstance(value, tuple):
        mean, low, high = value
        if high - low <= 0:
            return _fmt(mean, spec)
        return f"{_fmt(mean, spec)} {plus_minus} {_fmt((high - low) / 2, spec)}"
    if value is None:
        return "--"
    return str(value) if spec == "d" else _fmt(value, spec)


def quality_markdown(table: dict[str, dict[str, Any]]) -> str:
    """Method x quality metrics and speed, mean ± 95 % interval over runs."""
    lines = ["| method | " + " | ".join(title for _, title, _ in QUALITY_COLUMNS) + " |",
             "|---|" + "---:|" * len(QUALITY_COLUMNS)]
    for method, row in table.items():
        cells = [_interval_cell(row.get(key), spec) for key, _, spec in QUALITY_COLUMNS]
        lines.append(f"| {method.replace('|', '/')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_latex(table: dict[str, dict[str, Any]]) -> str:
    lines = [r"\begin{tabular}{l" + "r" * len(QUALITY_COLUMNS) + "}", r"\toprule",
             "method & " + " & ".join(latex_escape(title) for _, title, _ in QUALITY_COLUMNS) + r" \\",
             r"\midrule"]
    for method, row in table.items():
        cells = [_interval_cell(row.get(key), spec, r"$\pm$") for key, _, spec in QUALITY_COLUMNS]
        lines.append(latex_escape(method) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
