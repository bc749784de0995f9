"""Drive one strategy over one prompt: emit RunStarted, stream the strategy's events, stop, emit RunFinished.

The runner owns everything strategies share: stop conditions (EOS, stop strings, max new tokens), timing,
forward-pass counting, the seeded generator, and the recorder. A run that raises, is interrupted (Ctrl-C) or
is abandoned by its consumer (a Stop button closing the generator) still gets a RunFinished with its status,
and the recorder stores it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import torch

from explorer.events import (
    STATUS_CANCELLED,
    STATUS_FAILED,
    STATUS_OK,
    RunFinished,
    RunStarted,
    TokenStep,
)
from explorer.recorder import Recorder
from explorer.strategies import config_dict, get_strategy


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("decoding-explorer", "torch", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_strategy(
    model: Any,
    strategy: str,
    config: Any,
    prompt: str,
    *,
    chat: bool | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    recorder: Recorder | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Yield every event of one run; the last one is its RunFinished (unless the run raised)."""
    spec = get_strategy(strategy)
    if not isinstance(config, spec.config):
        raise ValueError(f"strategy {strategy!r} needs a {spec.config.__name__}, got {type(config).__name__}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    stops = [s for s in stop_strings if s]
    model = model.for_run()  # count this run's forward passes only
    if chat is None:
        chat = model.has_chat_template
    prompt_ids = model.encode_prompt(prompt, chat=chat, system_prompt=system_prompt)
    recorder = recorder or Recorder()
    started = RunStarted(
        run_id=new_run_id(),
        strategy=strategy,
        config=config_dict(config),
        model_id=model.info.model_id,
        weights_hash=model.info.weights_hash,
        dtype=model.info.dtype,
        device=model.info.device,
        seed=seed,
        versions=library_versions(),
        prompt=prompt,
        chat=chat,
        system_prompt=system_prompt,
        prompt_ids=prompt_ids,
        max_new_tokens=max_new_tokens,
        stop_strings=stops,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        tags=dict(tags or {}),
    )
    recorder.start(started)

    rng = torch.Generator(device=model.device).manual_seed(seed)
    eos = model.eos_token_ids
    generated: list[int] = []
    # Time is counted only while this run computes, not while its consumer holds it (interleaved lanes).
    busy = 0.0
    prefill_time = 0.0
    status, stop_reason, error = STATUS_OK, "max_new_tokens", None
    budget = {"max_new_tokens": max_new_tokens} if spec.needs_budget else {}
    events = spec.run(model, prompt_ids, config, rng, **budget)

    def finish() -> RunFinished:
        finished = RunFinished(
            status=status,
            stop_reason=stop_reason,
            error=error,
            text=model.decode(generated),
            new_tokens=len(generated),
            wall_time_s=busy,
            prefill_time_s=prefill_time,
            target_forward_passes=model.forward_passes,
        )
        recorder.finish(finished)
        return finished

    try:
        yield started
        mark = time.perf_counter()
        for event in events:
            if isinstance(event, TokenStep):
                if not generated:
                    prefill_time = busy + time.perf_counter() - mark
                generated.append(event.token_id)
            recorder.observe(event)
            busy += time.perf_counter() - mark
            yield event
            mark = time.perf_counter()
            if isinstance(event, TokenStep):
                reason = _stop_reason(model, generated, eos, stops, max_new_tokens)
                if reason:
                    stop_reason = reason
                    break
    except (GeneratorExit, KeyboardInterrupt):
        status, stop_reason, error = STATUS_CANCELLED, "cancelled", "cancelled by the user"
        finish()
        raise
    except Exception as exc:
        status, stop_reason, error = STATUS_FAILED, "error", f"{type(exc).__name__}: {exc}"
        finish()
        raise
    finally:
        events.close()
    yield finish()


def _stop_reason(model: Any, generated: list[int], eos: frozenset[int], stops: list[str], limit: int) -> str:
    if generated[-1] in eos:
        return "eos"
    if stops:
        tail = model.decode(generated[-32:])  # stop strings are short: the recent tail is enough
        if any(s in tail for s in stops):
            return "stop_string"
    if len(generated) >= limit:
        return "max_new_tokens"
    return ""


def run_to_end(model: Any, strategy: str, config: Any, prompt: str, **kwargs: Any) -> Any:
    """Run to completion and return the recorded Trace (convenience for scripts and tests)."""
    recorder = kwargs.pop("recorder", None) or Recorder()
    for _ in run_strategy(model, strategy, config, prompt, recorder=recorder, **kwargs):
        pass
    return recorder.trace
