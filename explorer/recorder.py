"""The recorder: an observer that builds the in-memory Trace and writes it to the store in batches.

Writes happen every `batch_size` events and at the end, each batch in one transaction, so recording costs
little per step and the database always holds a consistent prefix of the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from explorer.events import RunFinished, RunStarted
from explorer.trace import Trace


class RunSink(Protocol):
    """Where a recorder writes a run (store.Store is one)."""

    def begin_run(self, started: RunStarted, owner: str | None = None) -> None: ...

    def append_events(self, run_id: str, first_seq: int, events: Sequence[Any],
                      finished: RunFinished | None = None) -> None: ...

    def run_ended(self, trace: Trace) -> None: ...


class Recorder:
    """Records the events it is given, nothing else (the run's clock is the runner's: runner.RunClock)."""

    def __init__(self, store: RunSink | None = None, batch_size: int = 64, owner: str | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.store = store
        self.owner = owner  # who may list and delete the stored run (an app session); None: anyone local
        self.batch_size = batch_size
        self.trace: Trace | None = None
        self._pending: list[Any] = []
        self._written = 0

    def start(self, started: RunStarted) -> None:
        self.trace = Trace(started)
        if self.store is not None:
            self.store.begin_run(started, owner=self.owner)

    def observe(self, event: Any) -> None:
        if self.trace is None:
            raise ValueError("Recorder.start must come before observe")
        self.trace.add(event)
        self._pending.append(event)
        if len(self._pending) >= self.batch_size:
            self._flush()

    def finish(self, finished: RunFinished) -> None:
        if self.trace is None:
            raise ValueError("Recorder.start must come before finish")
        self.trace.add(finished)
        self._flush(finished)
        if self.store is not None:
            self.store.run_ended(self.trace)  # e.g. mirrored to a bundle folder

    def _flush(self, finished: RunFinished | None = None) -> None:
        if self.store is not None and (self._pending or finished is not None):
            self.store.append_events(self.trace.run_id, self._written, self._pending, finished)
        self._written += len(self._pending)
        self._pending = []
