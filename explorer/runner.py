"""Drive one strategy over one prompt: emit RunStarted, stream the strategy's events, stop, emit RunFinished.

The runner owns everything strategies share: stop conditions (EOS, stop strings, max new tokens), timing,
forward-pass counting, the seeded generator, and the recorder. A run that raises, is interrupted (Ctrl-C) or
is abandoned by its consumer (a Stop button closing the generator) still gets a RunFinished with its status,
and the recorder stores it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import (
    CANVAS_AUTOREGRESSIVE,
    CANVAS_DIFFUSION,
    STATUS_CANCELLED,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_STOPPED,
    Event,
    QualityProbe,
    RunFinished,
    TokenStep,
)
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.strategies import get_strategy
from explorer.trace import Trace


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


def encode_request(model: Any, request: RunRequest) -> tuple[bool, list[int]]:
    """(chat template used, prompt token ids) of a request on this model; ValueError past its token limit."""
    chat = model.has_chat_template if request.chat is None else request.chat
    prompt_ids = model.encode_prompt(request.prompt, chat=chat, system_prompt=request.system_prompt,
                                     history=request.history)
    if request.max_prompt_tokens is not None and len(prompt_ids) > request.max_prompt_tokens:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the limit here is {request.max_prompt_tokens}")
    return chat, prompt_ids


@dataclass
class RunClock:
    """A run's live counters, kept by its runner while it runs (for live displays: lanes read them after each
    event): compute seconds so far, target forward passes so far, compute seconds to the first token (0 until it
    comes). Time is counted only while the run computes, not while its consumer holds it."""

    busy_s: float = 0.0
    forward_passes: int = 0
    prefill_s: float = 0.0


def run_strategy(model: Any, request: RunRequest, *, recorder: Recorder | None = None,
                 clock: RunClock | None = None) -> Iterator[Event]:
    """Yield every event of one run; the last one is its RunFinished (unless the run raised). `clock`, when
    given, follows the run's compute time and passes as it goes."""
    spec = get_strategy(request.strategy)
    config, max_new_tokens, stops = request.config, request.max_new_tokens, list(request.stop_strings)
    model = model.for_run()  # count this run's forward passes only
    chat, prompt_ids = encode_request(model, request)
    if getattr(model, "diffusion", None) is not None:
        if spec.family != "diffusion":
            raise ValueError(f"{model.info.model_id} is a masked diffusion LM: choose a diffusion strategy "
                             "(diffusion, prophet, credit_decoding)")
        if request.prefix:
            raise ValueError("branches continue a run token by token: a masked diffusion LM cannot (branch a run "
                             "of a causal LM)")
    if spec.family == "diffusion" and (request.lens or request.attention):
        raise ValueError("the logit lens and attention records follow one token per step: turn them off for a "
                         "diffusion strategy (its own record is the unmasking order)")
    if spec.prepare is not None:
        spec.prepare(model, config)  # e.g. load the draft model: bad input is refused before a run is stored
    recorder = recorder or Recorder()
    started = request.run_started(run_id=new_run_id(), model_info=model.info, chat=chat, prompt_ids=prompt_ids,
                                  versions=library_versions())
    if spec.family == "diffusion":  # say what read the canvas: a causal LM decodes it one token per step
        reader = CANVAS_DIFFUSION if getattr(model, "diffusion", None) is not None else CANVAS_AUTOREGRESSIVE
        started = dataclasses.replace(started, tags={**started.tags, "canvas": reader})
    probe = None
    if request.lens or request.attention:  # made before the run is stored: a bad layer range refuses it
        from explorer.probes import Probe, parse_layer_range

        layers = parse_layer_range(request.attention_layers, model.model.config.num_hidden_layers)
        probe = Probe(model, prompt_ids, lens=request.lens, attention=request.attention, layers=layers,
                      top=request.attention_top)
        started = dataclasses.replace(started, probes=request.probes(layers))
    recorder.start(started)

    rng = torch.Generator(device=model.device).manual_seed(request.seed)
    eos = model.eos_token_ids
    generated: list[int] = []
    clock = clock or RunClock()
    status, stop_reason, error = STATUS_OK, "max_new_tokens", None
    prefix = list(request.prefix)
    budget = {"max_new_tokens": max_new_tokens - len(prefix)} if spec.needs_budget else {}
    if prefix:  # a branch: its forced tokens first, then the strategy from prompt + prefix, steps numbered on
        events = _branch_events(model, prompt_ids, prefix, spec.run(model, prompt_ids + prefix, config, rng, **budget))
    else:
        events = spec.run(model, prompt_ids, config, rng, **budget)

    def finish(passes: int | None = None) -> RunFinished:
        """The run's end, stored; `passes`: its forward passes counted before the quality probe's own."""
        finished = RunFinished(
            status=status,
            stop_reason=stop_reason,
            error=error,
            text=model.decode(generated),
            new_tokens=len(generated),
            wall_time_s=clock.busy_s,
            prefill_time_s=clock.prefill_s,
            target_forward_passes=model.forward_passes if passes is None else passes,
        )
        recorder.finish(finished)
        return finished

    try:
        yield started
        mark = time.perf_counter()
        for event in events:
            if isinstance(event, TokenStep):
                if not generated:
                    clock.prefill_s = clock.busy_s + time.perf_counter() - mark
                generated.append(event.token_id)
            recorder.observe(event)
            clock.busy_s += time.perf_counter() - mark
            clock.forward_passes = model.forward_passes
            yield event
            if probe is not None and isinstance(event, TokenStep):  # not counted in the run's compute time
                for extra in probe.observe(event):
                    recorder.observe(extra)
                    yield extra
            mark = time.perf_counter()
            if isinstance(event, TokenStep):
                reason = _stop_reason(model, generated, eos, stops, max_new_tokens)
                if reason:
                    stop_reason = reason
                    break
            if request.time_limit_s is not None and clock.busy_s > request.time_limit_s:
                status, stop_reason = STATUS_STOPPED, "time_limit"
                error = f"stopped at its time limit of {request.time_limit_s:g} s"
                break
        if not generated and status == STATUS_OK:  # a strategy that ends without a token has failed
            status, stop_reason, error = STATUS_FAILED, "no_tokens", "the strategy produced no tokens"
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
    passes = model.forward_passes
    if status == STATUS_OK and request.quality and spec.family != "diffusion":
        probe_event = quality_probe(model, prompt_ids, generated)
        recorder.observe(probe_event)
        try:
            yield probe_event
        except (GeneratorExit, KeyboardInterrupt):  # the run itself had ended: store it as it ended
            finish(passes)
            raise
    yield finish(passes)


def quality_probe(model: Any, prompt_ids: list[int], generated: list[int]) -> QualityProbe:
    """What needs the model once a run has ended (explorer.quality): coherence. Outside the run's timing and pass
    count; a model that cannot give hidden states records None."""
    from explorer.quality import coherence

    try:
        value = coherence(model, prompt_ids, generated)
    except Exception:  # noqa: BLE001 - e.g. a wrapped model without hidden states: the run stands without it
        value = None
    return QualityProbe(coherence=value, layer=-1)


def _branch_events(model: Any, prompt_ids: list[int], prefix: list[int], events: Iterator[Event]
                   ) -> Iterator[Event]:
    """A branch's events: a TokenStep for each forced token (from one forward pass over prompt + prefix: the
    model's own distribution there; origin "prefix", the last one "forced"), then the strategy's events with
    their `step` moved past the prefix (positions are absolute already)."""
    from explorer.strategies.base import commit_token

    try:
        logits = model.session().forward(prompt_ids + prefix[:-1], all_logits=True).logits[len(prompt_ids) - 1:]
        for index, token in enumerate(prefix):
            yield commit_token(model, index, len(prompt_ids) + index, token, logits[index],
                               origin="forced" if index == len(prefix) - 1 else "prefix")
        offset = len(prefix)
        for event in events:
            if isinstance(getattr(event, "step", None), int):
                changes = {"step": event.step + offset}
                if isinstance(getattr(event, "end_steps", None), list):
                    changes["end_steps"] = [s + offset for s in event.end_steps]
                event = dataclasses.replace(event, **changes)
            yield event
    finally:
        events.close()


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


def run_to_end(model: Any, request: RunRequest, *, recorder: Recorder | None = None) -> Trace:
    """Run to completion and return the recorded Trace (convenience for scripts and tests)."""
    recorder = recorder or Recorder()
    for _ in run_strategy(model, request, recorder=recorder):
        pass
    return recorder.trace
