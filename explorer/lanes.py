"""Lanes: several runs on one prompt, interleaved step by step, so that all of them stream at once.

Two halves, so that decoding can run in another process (a ZeroGPU worker, forked per request, which pickles
every yield back) while the database is written only where the request came in:
  - `lane_events(model, requests)` decodes and yields plain events, one round at a time; it touches no store;
  - `run_lanes(model, requests, store=...)` records those events (one Recorder per lane, in this process) and
    yields every lane's state after each round. A lane whose stream ends without a RunFinished (the worker was
    killed, Stop closed it) is stored as cancelled or failed from here, with every step that arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from explorer.events import STATUS_CANCELLED, STATUS_FAILED, RunFinished, RunStarted, TokenStep
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import RunClock, encode_request, run_strategy
from explorer.trace import Trace


@dataclass
class LaneResult:
    trace: Trace | None = None
    error: str | None = None
    live: tuple[float, int] = (0.0, 0)  # compute seconds and target passes so far
    prefill_s: float = 0.0  # compute seconds to the first token (0 until it comes)


@dataclass(frozen=True)
class LaneEvent:
    """One event of lane `lane`, with that run's compute seconds and target passes so far; `error` is set on
    the RunFinished of a lane that failed."""

    lane: int
    event: Any
    busy_s: float
    passes: int
    error: str | None = None
    prefill_s: float = 0.0


def lane_events(model: Any, requests: Sequence[RunRequest]) -> Iterator[list[LaneEvent]]:
    """Decode the lanes in turn, one event per lane per round; yield each round's events (plain, picklable
    dataclasses). A lane that raises ends with the failed RunFinished its runner made; the others go on."""
    if not requests:
        raise ValueError("add at least one lane")
    encode_request(model, requests[0])  # the lanes share the prompt: refuse it once, before any lane runs
    recorders = [Recorder() for _ in requests]  # in memory only: a failed lane's RunFinished is read from them
    clocks = [RunClock() for _ in requests]  # each run's live counters, kept by its runner
    runs = [run_strategy(model, request, recorder=recorder, clock=clock)
            for request, recorder, clock in zip(requests, recorders, clocks, strict=True)]
    active = list(range(len(requests)))
    turn = 0
    try:
        while active:
            # Rotate which lane goes first: whatever the consumer does between rounds (rendering, streaming)
            # then slows every lane alike instead of always the first one.
            turn += 1
            shift = turn % len(active)
            round_events = []
            for index in active[shift:] + active[:shift]:
                recorder, clock = recorders[index], clocks[index]
                try:
                    event, error = next(runs[index]), None
                except StopIteration:
                    active.remove(index)
                    continue
                except Exception as exc:  # the runner stored a failed RunFinished: pass it on
                    active.remove(index)
                    # (None when it failed before its RunStarted: a draft model refused in prepare)
                    event, error = recorder.trace and recorder.trace.finished, f"{type(exc).__name__}: {exc}"
                round_events.append(LaneEvent(index, event, clock.busy_s, clock.forward_passes, error,
                                              clock.prefill_s))
            if round_events:
                yield round_events
    finally:
        for run in runs:
            run.close()


def run_lanes(model: Any, requests: Sequence[RunRequest], *, store: Any | None = None, owner: str | None = None,
              events: Callable[[Any, Sequence[RunRequest]], Iterator[list[LaneEvent]]] = lane_events,
              ) -> Iterator[list[LaneResult]]:
    """Yield every lane's state after each round. The requests are validated already; a prompt the model cannot
    encode raises ValueError before anything runs; a lane that fails mid-way is stored as failed and the others
    go on. `events` produces the lanes' events (`lane_events` here, or the same run in a GPU worker)."""
    recorders = [Recorder(store, owner=owner) for _ in requests]
    results = [LaneResult() for _ in requests]
    stream = events(model, requests)
    status, reason = STATUS_CANCELLED, "cancelled by the user"  # how a run the stream leaves open is stored
    try:
        for round_events in stream:
            for item in round_events:
                recorder, result = recorders[item.lane], results[item.lane]
                if item.event is None:
                    pass
                elif isinstance(item.event, RunStarted):
                    recorder.start(item.event)
                elif isinstance(item.event, RunFinished):
                    recorder.finish(item.event)
                else:
                    recorder.observe(item.event)
                if item.error:
                    result.error = item.error
                result.trace, result.live, result.prefill_s = recorder.trace, (item.busy_s, item.passes), item.prefill_s
            yield results
        status, reason = STATUS_FAILED, "the decoding worker stopped before the run ended"
    except Exception as exc:  # the worker failed (a GPU worker lost, ...): its open runs are stored as failed
        status, reason = STATUS_FAILED, f"{type(exc).__name__}: {exc}"
        raise
    finally:
        stream.close()
        for recorder, result in zip(recorders, results, strict=True):
            if recorder.trace is not None and recorder.trace.finished is None:  # the stream ended early
                recorder.finish(unfinished(model, recorder.trace, status, reason, result.live, result.prefill_s))


def unfinished(model: Any, trace: Trace, status: str, reason: str, live: tuple[float, int],
               prefill_s: float = 0.0) -> RunFinished:
    """The RunFinished of a run whose decoding ended without one, from the steps that arrived."""
    tokens = [e.token_id for e in trace.events if isinstance(e, TokenStep)]
    return RunFinished(status=status, stop_reason="cancelled" if status == STATUS_CANCELLED else "error",
                       error=reason, text=model.decode(tokens), new_tokens=len(tokens), wall_time_s=live[0],
                       prefill_time_s=prefill_s, target_forward_passes=live[1])
