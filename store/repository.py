"""The repository: `Store` saves, loads, lists and deletes runs as `Trace` objects (ORM rows never leave this
module). It holds the engine and opens one session (one transaction) per call. SQLite by default (WAL journal,
foreign keys on); any SQLAlchemy URL works.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, or_, select
from sqlalchemy import text as sql_text
from sqlalchemy.orm import Session, sessionmaker

from explorer.events import STATUS_RUNNING, RunFinished, RunStarted, from_dict, to_dict
from explorer.paths import cache_root
from explorer.trace import Trace
from store.codec import decode, dumps, encode
from store.tables import SCHEMA_VERSION, Base, EventRow, MetaRow, RunRow


def default_url() -> str:
    """`$DECODING_EXPLORER_DB`, else a SQLite file in the cache directory."""
    env = os.environ.get("DECODING_EXPLORER_DB")
    if env:
        return env
    path = cache_root() / "runs.sqlite"
    return f"sqlite:///{path}"


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    created_at: str
    strategy: str
    model_id: str
    prompt: str
    seed: int
    status: str
    error: str | None
    text: str
    new_tokens: int
    wall_time_s: float | None


def _summary(row: RunRow) -> RunSummary:
    return RunSummary(
        run_id=row.id,
        created_at=row.created_at,
        strategy=row.strategy,
        model_id=row.model_id,
        prompt=row.prompt,
        seed=row.seed,
        status=row.status,
        error=row.error,
        text=row.text,
        new_tokens=row.new_tokens,
        wall_time_s=row.wall_time_s,
    )


def _run_row(started: RunStarted) -> RunRow:
    return RunRow(
        id=started.run_id,
        created_at=started.created_at,
        strategy=started.strategy,
        model_id=started.model_id,
        prompt=started.prompt,
        seed=started.seed,
        status=STATUS_RUNNING,
        error=None,
        text="",
        new_tokens=0,
        wall_time_s=None,
        sweep_key=started.tags.get("sweep_key"),
        started=dumps(to_dict(started)),
        finished=None,
    )


def _add_events(session: Session, run_id: str, first_seq: int, events: Sequence[Any],
                finished: RunFinished | None) -> None:
    rows = []
    for seq, item in enumerate(events, start=first_seq):
        kind, fields, arrays = encode(item)
        rows.append(EventRow(run_id=run_id, seq=seq, kind=kind, fields=fields, arrays=arrays))
    session.add_all(rows)
    if finished is not None:
        run = session.get(RunRow, run_id)
        if run is None:
            raise ValueError(f"run {run_id} does not exist")
        run.status, run.error, run.text = finished.status, finished.error, finished.text
        run.new_tokens, run.wall_time_s = finished.new_tokens, finished.wall_time_s
        run.finished = dumps(to_dict(finished))


def _load(session: Session, run_id: str) -> Trace:
    run = session.get(RunRow, run_id)
    if run is None:
        raise ValueError(f"no run with id {run_id!r}: list stored runs with `python -m explorer runs`")
    trace = Trace(from_dict(RunStarted.kind, json.loads(run.started)))
    rows = session.scalars(select(EventRow).where(EventRow.run_id == run_id).order_by(EventRow.seq))
    for row in rows:
        trace.add(decode(row.kind, row.fields, row.arrays))
    if run.finished is not None:
        trace.add(from_dict(RunFinished.kind, json.loads(run.finished)))
    return trace


# -------------------------------------------------------------------------------------------- Store
class Store:
    """The repository: an engine plus one transaction per call. `Store()` opens the default database."""

    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        self.engine = _make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        _prepare_schema(self.engine)

    def _tx(self) -> Any:
        return self._sessions.begin()

    def begin_run(self, started: RunStarted) -> None:
        """Store a run as running, before its first event."""
        with self._tx() as session:
            session.add(_run_row(started))

    def append_events(self, run_id: str, first_seq: int, events: Sequence[Any],
                      finished: RunFinished | None = None) -> None:
        """Append a batch of a run's events (numbered from `first_seq`), and its end when it has one."""
        with self._tx() as session:
            _add_events(session, run_id, first_seq, events, finished)

    def save_trace(self, trace: Trace) -> None:
        """Insert a whole trace (e.g. an imported one) in one transaction."""
        with self._tx() as session:
            session.add(_run_row(trace.started))
            session.flush()
            _add_events(session, trace.run_id, 0, trace.events, trace.finished)
            if trace.finished is None:
                session.get(RunRow, trace.run_id).new_tokens = len(trace.token_steps)

    def load_trace(self, run_id: str) -> Trace:
        with self._tx() as session:
            return _load(session, run_id)

    def load_traces(self, run_ids: Iterable[str]) -> list[Trace]:
        with self._tx() as session:
            return [_load(session, run_id) for run_id in run_ids]

    def list_runs(self, *, strategy: str | None = None, model: str | None = None, text: str | None = None,
                  limit: int = 100) -> list[RunSummary]:
        """Newest first, filtered by strategy, by a substring of the model id, and by text in prompt or output."""
        query = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id).limit(limit)
        if strategy:
            query = query.where(RunRow.strategy == strategy)
        if model:
            query = query.where(RunRow.model_id.contains(model, autoescape=True))
        if text:
            query = query.where(
                or_(RunRow.prompt.contains(text, autoescape=True), RunRow.text.contains(text, autoescape=True))
            )
        with self._tx() as session:
            return [_summary(row) for row in session.scalars(query)]

    def delete_run(self, run_id: str) -> bool:
        with self._tx() as session:
            session.execute(delete(EventRow).where(EventRow.run_id == run_id))
            return session.execute(delete(RunRow).where(RunRow.id == run_id)).rowcount > 0

    def completed_sweep_keys(self, keys: Iterable[str]) -> dict[str, str]:
        """Which of these sweep keys already have a run that finished ok: {sweep key: run id}."""
        keys = list(keys)
        found: dict[str, str] = {}
        with self._tx() as session:
            for start in range(0, len(keys), 500):
                query = select(RunRow.sweep_key, RunRow.id).where(RunRow.sweep_key.in_(keys[start:start + 500]),
                                                                  RunRow.status == "ok")
                found.update((key, run_id) for key, run_id in session.execute(query) if key)
        return found

    def run_ids(self, *, sweep_only: bool = False) -> list[str]:
        query = select(RunRow.id).order_by(RunRow.created_at, RunRow.id)
        if sweep_only:
            query = query.where(RunRow.sweep_key.is_not(None))
        with self._tx() as session:
            return list(session.scalars(query))

    def count_runs(self) -> int:
        with self._tx() as session:
            return int(session.scalar(select(func.count()).select_from(RunRow)) or 0)

    def close(self) -> None:
        self.engine.dispose()


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = url.split(":///", 1)[1] if ":///" in url else ""
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url)


MIGRATIONS = {
    # version -> statements that bring a database of that version to the next one
    1: ["ALTER TABLE runs ADD COLUMN sweep_key VARCHAR(64)", "CREATE INDEX ix_runs_sweep_key ON runs (sweep_key)"],
}


def _prepare_schema(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        row = session.get(MetaRow, "schema_version")
        if row is None:
            session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        version = int(row.value) if row.value.isdigit() else -1
        while version in MIGRATIONS and version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                session.execute(sql_text(statement))
            version += 1
            row.value = str(version)
        if row.value != str(SCHEMA_VERSION):
            raise ValueError(
                f"the database was written with schema version {row.value}, this program uses "
                f"{SCHEMA_VERSION}: open another database (--db) or export and re-import its runs"
            )
