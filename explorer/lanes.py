"""Lanes: several runs on one prompt, interleaved step by step, so that all of them stream at once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import encode_request, run_strategy
from explorer.trace import Trace


@dataclass
class LaneResult:
    trace: Trace | None = None
    error: str | None = None
    live: tuple[float, int] = (0.0, 0)  # compute seconds and target passes so far


def run_lanes(model: Any, requests: Sequence[RunRequest], *, store: Any | None = None, owner: str | None = None
              ) -> Iterator[list[LaneResult]]:
    """Yield every lane's state after each round (one event per lane per round). The requests are validated
    already; a prompt the model cannot encode raises ValueError before anything runs; a lane that fails mid-way
    is stored as failed and the others go on."""
    if not requests:
        raise ValueError("add at least one lane")
    encode_request(model, requests[0])  # the lanes share the prompt: refuse it once, before any lane runs
    recorders = [Recorder(store, owner=owner) for _ in requests]
    results = [LaneResult() for _ in requests]
    runs = [run_strategy(model, request, recorder=recorder) for request, recorder in zip(requests, recorders,
                                                                                        strict=True)]
    active = list(range(len(requests)))
    turn = 0
    try:
        while active:
            # Rotate which lane goes first: whatever the consumer does between rounds (rendering, streaming)
            # then slows every lane alike instead of always the first one.
            turn += 1
            shift = turn % len(active)
            for index in active[shift:] + active[:shift]:
                try:
                    next(runs[index])
                except StopIteration:
                    active.remove(index)
                except Exception as error:  # stored as failed by the runner; show it, keep the other lanes
                    results[index].error = f"{type(error).__name__}: {error}"
                    active.remove(index)
                results[index].trace = recorders[index].trace
                results[index].live = (recorders[index].busy_s, recorders[index].forward_passes)
            yield results
    finally:
        for run in runs:
            run.close()  # a lane still running when the consumer stops is stored as cancelled
