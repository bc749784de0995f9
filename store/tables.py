"""SQLAlchemy 2.0 typed tables: runs, their events, and the schema version.

Events are stored generically (kind + JSON fields + one packed BLOB of their numeric arrays), so a new event
kind needs no schema change. A run's RunStarted and RunFinished live on its `runs` row.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, Index, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 4  # 2: runs.sweep_key (resumable sweeps); 3: owner, and pid/host/heartbeat of a running run;
# 4: runs.parent_run (branches)


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[str] = mapped_column(String(32), index=True)
    strategy: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(512), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text, default="")
    new_tokens: Mapped[int] = mapped_column(default=0)
    wall_time_s: Mapped[float | None]
    sweep_key: Mapped[str | None] = mapped_column(String(64), index=True)  # from RunStarted.tags
    owner: Mapped[str | None] = mapped_column(String(128), index=True)  # the app session that made it (None: CLI)
    parent_run: Mapped[str | None] = mapped_column(String(32), index=True)  # a branch's parent (RunStarted's)
    pid: Mapped[int | None]  # the process running it, and when it last wrote (to find interrupted runs)
    host: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[str | None] = mapped_column(String(32))
    started: Mapped[str] = mapped_column(Text)  # RunStarted as JSON
    finished: Mapped[str | None] = mapped_column(Text)  # RunFinished as JSON


class EventRow(Base):
    __tablename__ = "events"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    fields: Mapped[str] = mapped_column(Text)  # JSON of the non-array fields and the array layout
    arrays: Mapped[bytes | None] = mapped_column(LargeBinary)  # packed int64/float64 arrays


Index("ix_events_run_kind", EventRow.run_id, EventRow.kind)
