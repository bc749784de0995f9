"""The repository: `Store` saves, loads, lists and deletes runs as `Trace` objects (ORM rows never leave this
module). It holds the engine and opens one session (one transaction) per call. SQLite by default (WAL journal,
foreign keys on); any SQLAlchemy URL works.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, make_url, or_, select, update
from sqlalchemy import text as sql_text
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from explorer.events import STATUS_INTERRUPTED, STATUS_RUNNING, RunFinished, RunStarted, TokenStep, from_dict, to_dict
from explorer.paths import cache_root
from explorer.trace import Trace
from explorer.viewer import Viewer
from store.codec import decode, dumps, encode
from store.tables import SCHEMA_VERSION, Base, EventRow, MetaRow, RunRow

log = logging.getLogger("decoding_explorer.store")


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
    """A row as a plain summary: every RunSummary field is the row's column of the same name (run_id: id)."""
    columns = {f.name: getattr(row, f.name) for f in dataclasses.fields(RunSummary) if f.name != "run_id"}
    return RunSummary(run_id=row.id, **columns)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _column(text: str | None) -> str | None:
    """Text for a plain column (listing and search): PostgreSQL's text cannot hold NUL, so it becomes U+FFFD.
    Nothing is lost: traces are read back from the JSON columns, where NUL is escaped."""
    return text.replace("\x00", "\ufffd") if text else text


def _run_row(started: RunStarted, owner: str | None = None, running_here: bool = False) -> RunRow:
    return RunRow(
        owner=owner,
        pid=os.getpid() if running_here else None,
        host=socket.gethostname() if running_here else None,
        heartbeat_at=_now() if running_here else None,
        id=started.run_id,
        created_at=started.created_at,
        strategy=started.strategy,
        model_id=_column(started.model_id),
        prompt=_column(started.prompt),
        seed=started.seed,
        status=STATUS_RUNNING,
        error=None,
        text="",
        new_tokens=0,
        wall_time_s=None,
        sweep_key=started.tags.get("sweep_key"),
        parent_run=started.parent_run,
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
    run = session.get(RunRow, run_id)
    if run is None:
        raise ValueError(f"run {run_id} does not exist")
    run.heartbeat_at = _now()
    if finished is not None:
        run.status, run.error, run.text = finished.status, _column(finished.error), _column(finished.text)
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


def _seen_by(viewer: Viewer | None, query: Any) -> Any:
    """`query` narrowed to the runs `viewer` may see: `Viewer.may_see` in SQL (every run for None)."""
    if viewer is None or viewer.gallery:
        return query
    return query.where(or_(RunRow.owner == viewer.owner, RunRow.id.in_(sorted(viewer.shared))))


# -------------------------------------------------------------------------------------------- Store
class Store:
    """The repository: an engine plus one transaction per call. `Store()` opens the default database."""

    def __init__(self, url: str | None = None, *, create: bool = True, bundle_dir: str | Path | None = None):
        """Open (with `create`, create) the database; ValueError with one line when that fails. On opening,
        runs left "running" by a process that is gone are marked interrupted. With `bundle_dir` (a mounted
        bucket on a Space), every run that ends is also written there as a bundle, and the bundles there that
        the database lacks are imported now."""
        self.url = url or default_url()
        self.bundle_dir = Path(bundle_dir) if bundle_dir else None
        try:
            self.engine = _make_engine(self.url, create)
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
            _prepare_schema(self.engine)
            self.mark_interrupted()
        except SQLAlchemyError as error:
            raise ValueError(f"cannot use the database {self.url}: {database_error(error)}") from None
        if self.bundle_dir is not None:
            try:
                self.bundle_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"cannot use the bundle folder {self.bundle_dir}: {error.strerror}") from None
            self.import_bundles()

    def run_ended(self, trace: Trace) -> None:
        """A run has its RunFinished: mirror it to the bundle folder (written aside, then renamed into place, so
        that a reader never sees half a bundle). A folder that fails is logged; the run stays stored here."""
        if self.bundle_dir is None:
            return
        from explorer.export import safe_name, write_bundle

        final = self.bundle_dir / f"{safe_name(trace.run_id)}.zip"
        partial = final.with_suffix(f".{os.getpid()}.part")
        try:
            write_bundle(trace, partial)
            os.replace(partial, final)
        except OSError as error:
            log.warning("run %s was not written to %s: %s", trace.run_id, self.bundle_dir, error)
            partial.unlink(missing_ok=True)

    def import_bundles(self) -> list[str]:
        """Import the bundles in the bundle folder whose runs this database lacks; a bundle that cannot be read
        is skipped with a log line. Returns the ids imported."""
        from explorer.export import read_bundle

        known, imported = set(self.run_ids()), []
        for path in sorted(self.bundle_dir.glob("*.zip")):
            try:
                trace = read_bundle(path)
                if trace.run_id in known:
                    continue
                self.save_trace(trace)
            except (ValueError, SQLAlchemyError) as error:
                log.warning("skipped the bundle %s: %s", path.name, str(error).splitlines()[0][:200])
                continue
            known.add(trace.run_id)
            imported.append(trace.run_id)
        if imported:
            log.info("imported %d runs from %s", len(imported), self.bundle_dir)
        return imported

    def _tx(self) -> Any:
        return self._sessions.begin()

    def begin_run(self, started: RunStarted, owner: str | None = None) -> None:
        """Store a run as running (by this process), before its first event."""
        with self._tx() as session:
            session.add(_run_row(started, owner, running_here=True))

    def append_events(self, run_id: str, first_seq: int, events: Sequence[Any],
                      finished: RunFinished | None = None) -> None:
        """Append a batch of a run's events (numbered from `first_seq`), and its end when it has one."""
        with self._tx() as session:
            _add_events(session, run_id, first_seq, events, finished)

    def save_trace(self, trace: Trace) -> None:
        """Insert a whole trace (e.g. an imported one) in one transaction."""
        self.save_traces([trace])

    def save_traces(self, traces: Sequence[Trace]) -> None:
        """Insert whole traces in one transaction: all of them or, if the database refuses one, none."""
        with self._tx() as session:
            for trace in traces:
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
                  limit: int = 100, viewer: Viewer | None = None) -> list[RunSummary]:
        """Newest first, filtered by strategy, by a substring of the model id, and by text in prompt or output;
        with a `viewer`, only the runs it may see."""
        query = _seen_by(viewer, select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id).limit(limit))
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

    def delete_run(self, run_id: str, viewer: Viewer | None = None) -> bool:
        """Delete a run (with a `viewer`: only one it may delete); whether one was deleted."""
        with self._tx() as session:
            run = session.get(RunRow, run_id)
            if run is None or (viewer is not None and not viewer.may_delete(run.owner)):
                return False
            session.execute(delete(EventRow).where(EventRow.run_id == run_id))
            return session.execute(delete(RunRow).where(RunRow.id == run_id)).rowcount > 0

    def family(self, run_ids: Iterable[str], *, viewer: Viewer | None = None, limit: int = 32) -> list[str]:
        """The branch families of these runs: each one's root (following parent links up), then every branch
        below it, oldest first, at most `limit`. With a `viewer`, only the runs it may see (a link to a run it
        may not see is not followed)."""
        visible = partial(_seen_by, viewer)
        with self._tx() as session:
            roots: list[str] = []
            for run_id in run_ids:
                seen = {run_id}
                while True:
                    parent = session.execute(visible(select(RunRow.parent_run).where(RunRow.id == run_id))).scalar()
                    if parent is None or parent in seen or session.execute(
                            visible(select(RunRow.id).where(RunRow.id == parent))).scalar() is None:
                        break
                    seen.add(parent)
                    run_id = parent
                if run_id not in roots:
                    roots.append(run_id)
            found, frontier = list(roots), list(roots)
            while frontier and len(found) < limit:
                children = session.execute(visible(
                    select(RunRow.id).where(RunRow.parent_run.in_(frontier)).order_by(RunRow.created_at, RunRow.id)))
                frontier = [c for c in children.scalars() if c not in found][:limit - len(found)]
                found += frontier
            created = dict(session.execute(select(RunRow.id, RunRow.created_at).where(RunRow.id.in_(found))).all())
        return sorted((f for f in found if f in created), key=lambda f: (created[f], f))

    def owners(self, run_ids: Iterable[str]) -> dict[str, str | None]:
        """{run id: owner} of the runs that exist."""
        ids = list(run_ids)
        with self._tx() as session:
            return dict(session.execute(select(RunRow.id, RunRow.owner).where(RunRow.id.in_(ids))).all())

    def mark_interrupted(self, stale_after_s: float = 600.0) -> list[str]:
        """Runs stored as running whose process is gone (this host: its pid is not alive; another host: no
        heartbeat for `stale_after_s`) become `interrupted`, with the steps they stored; return their ids."""
        here, now = socket.gethostname(), datetime.now(UTC)
        marked = []
        with self._tx() as session:
            for run in session.scalars(select(RunRow).where(RunRow.status == STATUS_RUNNING)):
                if run.host is None or run.pid is None:
                    continue  # imported or written by an older version: nobody to ask
                if run.host == here:
                    gone = not _alive(run.pid)
                else:
                    beat = datetime.fromisoformat(run.heartbeat_at) if run.heartbeat_at else None
                    gone = beat is None or (now - beat).total_seconds() > stale_after_s
                if not gone:
                    continue
                steps = session.scalar(select(func.count()).select_from(EventRow).where(
                    EventRow.run_id == run.id, EventRow.kind == TokenStep.kind)) or 0
                finished = RunFinished(status=STATUS_INTERRUPTED, stop_reason="interrupted",
                                       error="the process running it ended before it finished", text=run.text,
                                       new_tokens=int(steps), wall_time_s=0.0, prefill_time_s=0.0,
                                       target_forward_passes=0)
                run.status, run.error, run.new_tokens = finished.status, finished.error, finished.new_tokens
                run.finished = dumps(to_dict(finished))
                marked.append(run.id)
        return marked

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
        """Every run's id, oldest first; `sweep_only`: the runs of sweeps and the imported engine records that
        a report puts beside them."""
        query = select(RunRow.id).order_by(RunRow.created_at, RunRow.id)
        if sweep_only:
            query = query.where(RunRow.sweep_key.is_not(None) | (RunRow.strategy == "external"))
        with self._tx() as session:
            return list(session.scalars(query))

    def count_runs(self) -> int:
        with self._tx() as session:
            return int(session.scalar(select(func.count()).select_from(RunRow)) or 0)

    def close(self) -> None:
        self.engine.dispose()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def database_error(error: SQLAlchemyError) -> str:
    """The first line of a database error, without the SQL statement SQLAlchemy appends."""
    original = getattr(error, "orig", None)
    text = str(original if original is not None else error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _make_engine(url: str, create: bool = True) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"{url!r} is not a database URL: use e.g. sqlite:///runs.sqlite or "
                         "postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database).expanduser()
            if path.is_dir():
                raise ValueError(f"{path} is a directory: give a database file, e.g. sqlite:///{path}/runs.sqlite")
            if not create and not path.exists():
                raise ValueError(f"there is no database at {path}: check --db (nothing was created)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"cannot create the database folder {path.parent}: {error.strerror}") from None
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    try:
        return create_engine(parsed)
    except (ImportError, NoSuchModuleError) as error:
        raise ValueError(f"cannot open {parsed.get_backend_name()} databases here ({error}): install its driver, "
                         "e.g. pip install psycopg2-binary") from None


def _backfill_parent_runs(session: Session) -> None:
    """Branches stored before the column existed: their parent from their RunStarted."""
    rows = session.execute(select(RunRow.id, RunRow.started).where(RunRow.started.contains('"parent_run": "')))
    for run_id, started in rows.all():
        parent = json.loads(started).get("parent_run")
        if parent:
            session.execute(update(RunRow).where(RunRow.id == run_id).values(parent_run=parent))


MIGRATIONS = {
    # version -> statements that bring a database of that version to the next one
    1: ["ALTER TABLE runs ADD COLUMN sweep_key VARCHAR(64)", "CREATE INDEX ix_runs_sweep_key ON runs (sweep_key)"],
    2: ["ALTER TABLE runs ADD COLUMN owner VARCHAR(128)", "CREATE INDEX ix_runs_owner ON runs (owner)",
        "ALTER TABLE runs ADD COLUMN pid INTEGER", "ALTER TABLE runs ADD COLUMN host VARCHAR(255)",
        "ALTER TABLE runs ADD COLUMN heartbeat_at VARCHAR(32)"],
    3: ["ALTER TABLE runs ADD COLUMN parent_run VARCHAR(32)", "CREATE INDEX ix_runs_parent_run ON runs (parent_run)",
        _backfill_parent_runs],
}


def _prepare_schema(engine: Engine) -> None:
    """Create or migrate the schema. Two processes opening a new database at once may race to create it: the
    loser sees the winner's tables and version row on its second try."""
    for attempt in range(3):
        try:
            _create_or_migrate(engine)
            return
        except (IntegrityError, OperationalError):
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def _create_or_migrate(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        row = session.get(MetaRow, "schema_version")
        if row is None:
            session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        version = int(row.value) if row.value.isdigit() else -1
        while version in MIGRATIONS and version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                if callable(statement):
                    statement(session)
                else:
                    session.execute(sql_text(statement))
            version += 1
            row.value = str(version)
        if row.value != str(SCHEMA_VERSION):
            raise ValueError(
                f"the database was written with schema version {row.value}, this program uses "
                f"{SCHEMA_VERSION}: open another database (--db) or export and re-import its runs"
            )
