"""Our runs in the engines' per-request records, and their records in as runs (`export`/`import --format vllm|
sglang|aiperf|specbench`). The metric definitions are explorer.engines'; this module only speaks the shapes.

Shapes (field names exactly as the engines write them):
- vLLM: an OpenAI-compatible completion response with `metrics.speculative_decoding` (PR #48915, the detailed
  level: with `per_step_accepted` / `per_step_drafted`). One JSON object, or one per line.
- SGLang: a /generate response `{"text", "output_ids", "meta_info": {...}}` (meta_info's spec fields, with the
  names before PR #23530 read too: spec_accept_token_num, spec_draft_token_num, spec_accept_histogram).
- AIPerf: profile_export.jsonl lines `{"metadata", "metrics": {tag: {"value", "unit"}}, "spec_decode_acceptance",
  "error"}`; the acceptance record is checked as AIPerf checks it (sum h = steps, sum j h = accepted,
  accepted <= drafted). AIPerf keeps no output text.
- Spec-Bench: its answer files (`question_id`, `category`, `choices[].turns/new_tokens/wall_time/accept_lengths/
  decoding_steps`), one run per turn and choice, tagged as a Spec-Bench sweep's runs are, so the leaderboard
  reads them beside ours.

An imported run is `strategy == "external"` with tags `external` (the engine) and `method`, an EngineRecord with
what the record gave, and a RunFinished; it has no TokenSteps (no engine reports per-token distributions), so
the views that need them say so.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from explorer.engines import SpecSteps, aiperf_histogram, sglang_metrics, spec_steps, vllm_metrics
from explorer.events import EngineRecord, RunFinished, RunStarted
from explorer.trace import Trace

EXPORT_FORMATS = ("vllm", "sglang", "aiperf")
IMPORT_FORMATS = (*EXPORT_FORMATS, "specbench")
EXTERNAL = "external"  # RunStarted.strategy of an imported engine record
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_RECORDS = 100_000
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/=+-]{0,63}")


# ------------------------------------------------------------------------------------------------- out
def _finish_reason(trace: Trace) -> str:
    reason = trace.finished.stop_reason if trace.finished else "running"
    return {"eos": "stop", "stop_string": "stop", "length": "length"}.get(reason, reason)


def _prompt_tokens(trace: Trace) -> int:
    return len(trace.started.prompt_ids)


def vllm_record(trace: Trace) -> dict[str, Any]:
    """The run as a vLLM completion response; `metrics.speculative_decoding` only for a run that drafted (vLLM
    writes nothing there without speculative decoding)."""
    steps = spec_steps(trace)
    completion = trace.new_tokens
    record: dict[str, Any] = {
        "id": f"cmpl-{trace.run_id}", "object": "text_completion",
        "created": int(datetime.fromisoformat(trace.started.created_at).timestamp()),
        "model": trace.started.model_id,
        "choices": [{"index": 0, "text": trace.text, "finish_reason": _finish_reason(trace)}],
        "usage": {"prompt_tokens": _prompt_tokens(trace), "completion_tokens": completion,
                  "total_tokens": _prompt_tokens(trace) + completion},
    }
    if steps is not None and steps.draft_steps:
        metrics = vllm_metrics(steps)
        metrics.pop("per_position_acceptance_rate")  # the server's log line, not the response's
        record["metrics"] = {"speculative_decoding": metrics}
    return record


def sglang_record(trace: Trace) -> dict[str, Any]:
    """The run as an SGLang /generate response: text, output ids, meta_info (spec fields only for a run that
    drafted: SGLang writes none without a verify pass)."""
    steps = spec_steps(trace)
    meta: dict[str, Any] = {
        "id": trace.run_id, "finish_reason": {"type": _finish_reason(trace)},
        "prompt_tokens": _prompt_tokens(trace), "completion_tokens": trace.new_tokens, "cached_tokens": 0,
        "e2e_latency": trace.finished.wall_time_s if trace.finished else None,
    }
    if steps is not None and steps.steps:
        meta |= sglang_metrics(steps)
    return {"text": trace.text, "output_ids": trace.token_ids, "meta_info": meta}


def aiperf_record(trace: Trace) -> dict[str, Any]:
    """The run as one line of AIPerf's profile_export.jsonl (times in ns and ms as AIPerf writes them)."""
    steps = spec_steps(trace)
    start = datetime.fromisoformat(trace.started.created_at).timestamp()
    wall = trace.finished.wall_time_s if trace.finished else 0.0
    metrics: dict[str, Any] = {
        "input_sequence_length": {"value": _prompt_tokens(trace), "unit": "tokens"},
        "request_latency": {"value": 1000 * wall, "unit": "ms"},
        "time_to_first_token": {"value": 1000 * (trace.finished.prefill_time_s if trace.finished else 0.0),
                                "unit": "ms"},  # compute seconds to the first token
        "output_token_count": {"value": trace.new_tokens, "unit": "tokens"},
        "output_sequence_length": {"value": trace.new_tokens, "unit": "tokens"},
    }
    acceptance = None
    if steps is not None and steps.draft_steps:
        v = vllm_metrics(steps)
        acceptance = {"engine": "decoding-explorer", "mean_acceptance_length": v["mean_acceptance_length"],
                      "draft_acceptance_rate": v["draft_acceptance_rate"],
                      "acceptance_histogram": aiperf_histogram(steps),
                      "num_accepted_draft_tokens": v["num_accepted_draft_tokens"],
                      "num_draft_tokens": v["num_draft_tokens"], "num_spec_steps": v["num_spec_steps"],
                      "num_spec_tokens": v["num_spec_tokens"], "completion_tokens": trace.new_tokens,
                      "per_step_accepted": v["per_step_accepted"], "per_step_drafted": v["per_step_drafted"]}
        metrics |= {
            "spec_decode_acceptance_length": {"value": v["mean_acceptance_length"], "unit": "ratio"},
            "spec_decode_draft_acceptance_rate": {"value": 100 * v["draft_acceptance_rate"], "unit": "%"},
            "spec_decode_steps": {"value": v["num_spec_steps"], "unit": "count"},
            "spec_decode_accepted_draft_tokens": {"value": v["num_accepted_draft_tokens"], "unit": "tokens"},
            "spec_decode_draft_tokens": {"value": v["num_draft_tokens"], "unit": "tokens"},
        }
    failed = trace.finished is not None and trace.finished.status != "ok"
    return {
        "metadata": {"session_num": 0, "x_request_id": trace.run_id, "conversation_id": trace.run_id,
                     "turn_index": 0, "request_start_ns": int(start * 1e9),
                     "request_end_ns": int((start + wall) * 1e9), "benchmark_phase": "profiling",
                     "was_cancelled": trace.status == "cancelled", "cancellation_time_ns": None},
        "metrics": metrics,
        "spec_decode_acceptance": acceptance,
        "error": {"code": None, "type": trace.finished.status, "message": trace.finished.error} if failed else None,
    }


WRITERS = {"vllm": vllm_record, "sglang": sglang_record, "aiperf": aiperf_record}


def write_records(kind: str, traces: Iterable[Trace], out: str | Path) -> Path:
    """One JSON line per run in the engine's shape."""
    writer = WRITERS[kind]
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a directory: give a file name for the {kind} records")
    out.write_text("".join(json.dumps(_finite(writer(t)), ensure_ascii=False) + "\n" for t in traces),
                   encoding="utf-8")
    return out


def _finite(value: Any) -> Any:
    """NaN and infinities as null (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# -------------------------------------------------------------------------------------------------- in
class RecordError(ValueError):
    """A record that cannot be read, with where it is."""


def read_records(kind: str, path: str | Path, method: str | None = None, model: str | None = None,
                 category: str | None = None) -> list[Trace]:
    """Every record of an engine's file as an external run (nothing is stored here: the caller stores all or
    none). `method` labels them (default: the engine's name, or the answer file's method for Spec-Bench);
    `model` overrides the model id the record names; `category` tags every record with a prompt category."""
    if kind not in IMPORT_FORMATS:
        raise ValueError(f"unknown record format {kind!r}: one of {', '.join(IMPORT_FORMATS)}")
    for name, value in (("--method", method), ("--category", category)):
        if value is not None and not LABEL.fullmatch(value):
            raise ValueError(f"{name} must be a short label (letters, digits, . _ : / = + -)")
    path = Path(path)
    objects = _json_objects(path)
    reader = {"vllm": _from_vllm, "sglang": _from_sglang, "aiperf": _from_aiperf, "specbench": _from_specbench}[kind]
    traces: list[Trace] = []
    for number, data in objects:
        try:
            traces.extend(reader(data, method or _default_method(kind, path), model, path.name))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            detail = f"lacks {error}" if isinstance(error, KeyError) else str(error) or type(error).__name__
            raise RecordError(f"{path.name}:{number}: not a {kind} record ({detail})") from None
    if not traces:
        raise ValueError(f"{path.name} holds no {kind} records")
    if category is not None:
        for trace in traces:
            trace.started.tags["category"] = category
    return traces


def _default_method(kind: str, path: Path) -> str:
    if kind == "specbench":  # Spec-Bench names its answer files MODEL-METHOD.jsonl
        stem = path.stem.rsplit("-", 1)[-1]
        return stem if LABEL.fullmatch(stem) else kind
    return kind


def _json_objects(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The file's JSON objects with their line numbers: one object (a response), or JSON lines."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path.name} is larger than {MAX_FILE_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not UTF-8 text") from None
    try:
        whole = json.loads(text)
        if isinstance(whole, dict):
            return [(1, whole)]
        if isinstance(whole, list) and all(isinstance(item, dict) for item in whole):
            return list(enumerate(whole, start=1))[:MAX_RECORDS]
    except json.JSONDecodeError:
        pass
    objects = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.name}:{number}: not JSON ({error.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path.name}:{number}: expected a JSON object")
        objects.append((number, data))
        if len(objects) > MAX_RECORDS:
            raise ValueError(f"{path.name} has more than {MAX_RECORDS} records")
    return objects


def _int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise ValueError(f"{name} must be a count, got {str(value)[:20]!r}")
    return int(value)


def _float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {str(value)[:20]!r}")
    return float(value)


def _counts(values: Any, name: str) -> list[int]:
    if values is None:
        return []
    if not isinstance(values, list) or len(values) > 1_000_000:
        raise ValueError(f"{name} must be a list of counts")
    return [_int(v, name) or 0 for v in values]


def _text(value: Any, name: str, limit: int = 1_000_000) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text")
    return value[:limit]


def _reported(data: dict[str, Any]) -> dict[str, Any]:
    """The engine's own scalar numbers and flat lists, under its own names (nothing nested, bounded)."""
    out: dict[str, Any] = {}
    for key, value in list(data.items())[:64]:
        if not isinstance(key, str) or len(key) > 64:
            continue
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value if not isinstance(value, str) else value[:200]
        elif isinstance(value, list) and len(value) <= 4096 and all(
                isinstance(v, (int, float, bool)) or v is None for v in value):
            out[key] = value
    return out


def _check_histogram(histogram: list[int], steps: int | None, accepted: int | None, name: str) -> None:
    """AIPerf's invariants of an acceptance record: the histogram counts every step once and sums to the
    accepted tokens."""
    if steps is not None and sum(histogram) != steps:
        raise ValueError(f"{name} counts {sum(histogram)} steps, not {steps}")
    if accepted is not None and sum(j * h for j, h in enumerate(histogram)) != accepted:
        raise ValueError(f"{name} sums to {sum(j * h for j, h in enumerate(histogram))} accepted tokens, "
                         f"not {accepted}")


def _engine_record(engine: str, request_id: str, *, steps: int | None, draft_steps: int | None,
                   drafted: int | None, accepted: int | None, output: int | None, per_step_drafted: list[int],
                   per_step_accepted: list[int], histogram: list[int], reported: dict[str, Any],
                   latency: float | None = None, ttft: float | None = None,
                   token_ids: Sequence[int] = ()) -> EngineRecord:
    if accepted is not None and drafted is not None and accepted > drafted:
        raise ValueError(f"{accepted} accepted draft tokens of {drafted} proposed")
    if per_step_accepted and per_step_drafted and len(per_step_accepted) != len(per_step_drafted):
        raise ValueError("per_step_accepted and per_step_drafted differ in length")
    drafted_per_position: list[int] = []
    if per_step_accepted and per_step_drafted:
        counted = SpecSteps.of_steps(per_step_drafted, per_step_drafted, per_step_accepted)  # checks every step
        accepted_per_position = list(counted.accepted_per_position)
        drafted_per_position = list(counted.drafted_per_position or ())
    elif per_step_accepted:
        accepted_per_position = [sum(a > i for a in per_step_accepted) for i in range(max(per_step_accepted))]
    else:  # from the histogram (h[j] steps accepted exactly j): position i by the steps that accepted more than i
        accepted_per_position = [sum(histogram[i + 1:]) for i in range(len(histogram) - 1)]
    return EngineRecord(engine=engine, request_id=request_id[:128], steps=steps, draft_steps=draft_steps,
                        drafted_tokens=drafted, accepted_tokens=accepted, output_tokens=output,
                        per_step_drafted=per_step_drafted, per_step_depth=list(per_step_drafted),
                        per_step_accepted=per_step_accepted, accepted_per_position=accepted_per_position,
                        drafted_per_position=drafted_per_position, acceptance_histogram=histogram,
                        time_to_first_token_s=ttft, latency_s=latency,
                        token_ids=list(token_ids), reported=_reported(reported))


def external_trace(engine: str, method: str, model: str, source: str, record: EngineRecord, *, text: str,
                   status: str = "ok", stop_reason: str = "stop", error: str | None = None,
                   tags: dict[str, str] | None = None, created_at: str | None = None,
                   prompt: str = "", seed: int = 0) -> Trace:
    """An imported request as a run: marked external, its record and its end."""
    from explorer.runner import new_run_id

    started = RunStarted(
        run_id=new_run_id(), strategy=EXTERNAL, config={}, model_id=(model or "unknown")[:500], weights_hash="",
        dtype="", device=engine, seed=seed, versions={engine: "as reported"}, prompt=prompt, chat=False,
        system_prompt=None, prompt_ids=[], max_new_tokens=max(1, record.output_tokens or 1), stop_strings=[],
        created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        tags={EXTERNAL: engine, "method": method, "source": source[:200], **(tags or {})})
    trace = Trace(started)
    trace.add(record)
    trace.add(RunFinished(status=status, stop_reason=stop_reason[:64], error=error, text=text,
                          new_tokens=record.output_tokens or 0, wall_time_s=record.latency_s or 0.0,
                          prefill_time_s=record.time_to_first_token_s or 0.0,
                          target_forward_passes=record.steps or 0))
    return trace


def _from_vllm(data: dict[str, Any], method: str, model: str | None, source: str) -> list[Trace]:
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices, list) and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = _text(choice.get("text", message.get("content")), "choices[0].text")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    spec = (data.get("metrics") or {}).get("speculative_decoding")
    if spec is None and "choices" not in data:
        raise KeyError("'metrics.speculative_decoding' and 'choices'")
    spec = spec if isinstance(spec, dict) else {}
    steps = _int(spec.get("num_spec_steps"), "num_spec_steps")
    accepted = _int(spec.get("num_accepted_draft_tokens"), "num_accepted_draft_tokens")
    histogram = _counts(spec.get("acceptance_histogram"), "acceptance_histogram")
    if histogram:
        _check_histogram(histogram, steps, accepted, "acceptance_histogram")
    output = _int(usage.get("completion_tokens"), "usage.completion_tokens")
    record = _engine_record(
        "vllm", str(data.get("id", "")), steps=steps, draft_steps=steps,
        drafted=_int(spec.get("num_draft_tokens"), "num_draft_tokens"), accepted=accepted, output=output,
        per_step_drafted=_counts(spec.get("per_step_drafted"), "per_step_drafted"),
        per_step_accepted=_counts(spec.get("per_step_accepted"), "per_step_accepted"), histogram=histogram,
        reported=spec)
    return [external_trace("vllm", method, model or str(data.get("model", "")), source, record, text=text,
                           stop_reason=str(choice.get("finish_reason") or "stop"))]


def _from_sglang(data: dict[str, Any], method: str, model: str | None, source: str) -> list[Trace]:
    meta = data["meta_info"]
    if not isinstance(meta, dict):
        raise ValueError("meta_info must be an object")
    steps = _int(meta.get("spec_verify_ct"), "spec_verify_ct")
    accepted = _int(meta.get("spec_num_correct_drafts", meta.get("spec_accept_token_num")), "spec_num_correct_drafts")
    drafted = _int(meta.get("spec_num_proposed_drafts", meta.get("spec_draft_token_num")), "spec_num_proposed_drafts")
    histogram = _counts(meta.get("spec_correct_drafts_histogram", meta.get("spec_accept_histogram")),
                        "spec_correct_drafts_histogram")
    if histogram:
        _check_histogram(histogram, steps, accepted, "spec_correct_drafts_histogram")
    output = _int(meta.get("completion_tokens"), "completion_tokens")
    finish = meta.get("finish_reason")
    reason = finish.get("type") if isinstance(finish, dict) else finish
    ids = data.get("output_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError("output_ids must be token ids")
    # SGLang reports per pass only the histogram: the steps' order is unknown, their budget is nominal
    record = _engine_record("sglang", str(meta.get("id", "")), steps=steps, draft_steps=steps, drafted=drafted,
                            accepted=accepted, output=output, per_step_drafted=[], per_step_accepted=[],
                            histogram=histogram, reported=meta, latency=_float(meta.get("e2e_latency"), "e2e_latency"),
                            token_ids=ids[:1_000_000])
    return [external_trace("sglang", method, model or "", source, record, text=_text(data.get("text"), "text"),
                           stop_reason=str(reason or "stop"))]


def _metric(metrics: dict[str, Any], name: str) -> Any:
    entry = metrics.get(name)
    return entry.get("value") if isinstance(entry, dict) else None


def _from_aiperf(data: dict[str, Any], method: str, model: str | None, source: str) -> list[Trace]:
    metadata, metrics = data["metadata"], data["metrics"]
    if not isinstance(metadata, dict) or not isinstance(metrics, dict):
        raise ValueError("metadata and metrics must be objects")
    spec = data.get("spec_decode_acceptance") or {}
    if not isinstance(spec, dict):
        raise ValueError("spec_decode_acceptance must be an object")
    steps = _int(spec.get("num_spec_steps"), "num_spec_steps")
    accepted = _int(spec.get("num_accepted_draft_tokens"), "num_accepted_draft_tokens")
    sparse = spec.get("acceptance_histogram") or {}
    if not isinstance(sparse, dict):
        raise ValueError("acceptance_histogram must be {accepted: steps}")
    try:
        dense_at = {int(k): _int(v, "acceptance_histogram") or 0 for k, v in sparse.items()}
    except ValueError:
        raise ValueError("acceptance_histogram's keys must be counts") from None
    if any(k < 0 or k > 4096 for k in dense_at):
        raise ValueError("acceptance_histogram's keys must be counts")
    histogram = [dense_at.get(j, 0) for j in range(max(dense_at, default=-1) + 1)]
    if histogram:
        _check_histogram(histogram, steps, accepted, "acceptance_histogram")
    output = _int(_metric(metrics, "output_token_count") or spec.get("completion_tokens"), "output_token_count")
    latency_ms = _float(_metric(metrics, "request_latency"), "request_latency")
    ttft_ms = _float(_metric(metrics, "time_to_first_token"), "time_to_first_token")
    record = _engine_record(
        "aiperf", str(metadata.get("x_request_id", "")), steps=steps, draft_steps=steps,
        drafted=_int(spec.get("num_draft_tokens"), "num_draft_tokens"), accepted=accepted, output=output,
        per_step_drafted=_counts(spec.get("per_step_drafted"), "per_step_drafted"),
        per_step_accepted=_counts(spec.get("per_step_accepted"), "per_step_accepted"), histogram=histogram,
        reported={k: v for k, v in spec.items() if k != "acceptance_histogram"},
        latency=None if latency_ms is None else latency_ms / 1000, ttft=None if ttft_ms is None else ttft_ms / 1000)
    error = data.get("error")
    failed = bool(error) or bool(metadata.get("was_cancelled"))
    message = (error.get("message") if isinstance(error, dict) else str(error)) if error else None
    engine = spec.get("engine") if isinstance(spec.get("engine"), str) and LABEL.fullmatch(spec["engine"]) else None
    return [external_trace("aiperf", method, model or "", source, record, text="",
                           status="cancelled" if metadata.get("was_cancelled") else "failed" if failed else "ok",
                           stop_reason="error" if failed else "stop", error=_text(message, "error", 500) or None,
                           tags={"served_by": engine} if engine else None)]


def _answer_model(data: dict[str, Any], source: str) -> str:
    """The model of a Spec-Bench answer file: its name is MODEL-METHOD.jsonl (its rows' model_id is the stem)."""
    stem = Path(source).stem
    return stem.rsplit("-", 1)[0] if "-" in stem else _text(data.get("model_id"), "model_id", 200)


def _from_specbench(data: dict[str, Any], method: str, model: str | None, source: str) -> list[Trace]:
    question = _int(data["question_id"], "question_id")
    category = _text(data.get("category", "all"), "category", 64)
    choices = data["choices"]
    if not isinstance(choices, list) or not choices:
        raise ValueError("choices must be a non-empty list")
    traces = []
    for choice in choices:
        turns = [_text(t, "turns") for t in choice["turns"]]
        new_tokens = _counts(choice["new_tokens"], "new_tokens")
        walls = [_float(w, "wall_time") or 0.0 for w in choice["wall_time"]]
        lengths = _counts(choice["accept_lengths"], "accept_lengths")
        steps = _counts(choice.get("decoding_steps"), "decoding_steps")
        if not len(turns) == len(new_tokens) == len(walls) or (steps and len(steps) != len(turns)):
            raise ValueError("turns, new_tokens, wall_time and decoding_steps differ in length")
        if any(n < 1 for n in lengths) or (steps and sum(steps) != len(lengths)):
            raise ValueError("accept_lengths must hold one length >= 1 per decoding step")
        start = 0
        for turn, text in enumerate(turns):
            count = steps[turn] if steps else len(lengths) if len(turns) == 1 else 0
            mine = lengths[start:start + count]
            start += count
            record = _engine_record(
                "specbench", str(data.get("answer_id", "")), steps=len(mine) or None, draft_steps=None,
                drafted=None, accepted=sum(n - 1 for n in mine) if mine else None, output=new_tokens[turn],
                per_step_drafted=[], per_step_accepted=[n - 1 for n in mine], histogram=[],
                reported={"model_id": data.get("model_id"), "decoding_steps": len(mine)}, latency=walls[turn])
            traces.append(external_trace(
                "specbench", method, model or _answer_model(data, source), source, record,
                text=text, tags={"question_id": str(question), "turn": str(turn), "turns": str(len(turns)),
                                 "category": category}, seed=_int(choice.get("index", 0), "index") or 0))
    return traces

