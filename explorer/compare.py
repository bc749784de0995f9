"""Several strategies on one prompt, interleaved step by step, so that all lanes stream at once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from explorer.recorder import Recorder
from explorer.runner import run_strategy
from explorer.strategies import make_config
from explorer.trace import Trace


@dataclass(frozen=True)
class LaneSpec:
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class LaneResult:
    trace: Trace | None = None
    error: str | None = None


def run_lanes(
    model: Any,
    lanes: Sequence[LaneSpec],
    prompt: str,
    *,
    chat: bool | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    store: Any | None = None,
) -> Iterator[list[LaneResult]]:
    """Yield every lane's state after each round (one event per lane per round). Bad input raises ValueError
    before anything runs; a lane that fails mid-way is stored as failed and the others go on."""
    if not lanes:
        raise ValueError("add at least one lane")
    configs = [make_config(lane.strategy, lane.params) for lane in lanes]  # all validated before any run
    model.encode_prompt(prompt, chat=model.has_chat_template if chat is None else chat, system_prompt=system_prompt)
    recorders = [Recorder(store) for _ in lanes]
    results = [LaneResult() for _ in lanes]
    runs = [
        run_strategy(model, lane.strategy, config, prompt, chat=chat, system_prompt=system_prompt,
                     max_new_tokens=max_new_tokens, seed=seed, recorder=recorder)
        for lane, config, recorder in zip(lanes, configs, recorders, strict=True)
    ]
    active = list(range(len(lanes)))
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
            yield results
    finally:
        for run in runs:
            run.close()  # a lane still running when the consumer stops is stored as cancelled
