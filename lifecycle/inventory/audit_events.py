"""The audit trail's tables: events, the chain head, signed checkpoints; commit hooks.

The ``audit_head`` singleton row (id 1) holds the last (seq, hash). Appending locks it
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serialises
writers), so appenders in many processes produce one linear chain. What the rows mean, and how
they are hashed and verified, is ``lifecycle.audit``'s business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, LargeBinary, Text, event, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.errors import AuditError
from lifecycle.inventory.db import bulk_insert, is_postgres

HEAD_ID = 1
STREAM_CHUNK = 2000
_ON_COMMIT = "meterkeys.audit.on_commit"
_LISTENING = "meterkeys.audit.listening"


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"
    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    at: datetime
    principal: str = Field(max_length=128)
    role: str | None = Field(default=None, max_length=32)
    action: str = Field(max_length=64, index=True)
    outcome: str = Field(max_length=16)
    meter_serial: str | None = Field(default=None, max_length=64, index=True)
    batch_id: int | None = Field(default=None, index=True)
    key_version_id: int | None = None
    flow_run_id: str | None = Field(default=None, max_length=64)
    detail: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """Singleton row: the chain head. Appending locks it, so the chain stays linear."""

    __tablename__ = "audit_head"
    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str = Field(max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    __tablename__ = "audit_checkpoint"
    id: int | None = Field(default=None, primary_key=True)
    seq: int = Field(index=True)
    head_hash: str = Field(max_length=64)
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    key_label: str = Field(max_length=128)
    at: datetime


def lock_head(session: Session, genesis: str) -> tuple[int, str]:
    """Lock the chain head for this transaction (creating it if missing); return (seq, hash).

    Every appender takes this lock first, so other writers that must serialise with the audit
    trail (principal bootstrap) take it too.

    Raises:
        AuditError: the head row is missing while events exist (seq None).
    """
    stmt = select(col(AuditHead.seq), col(AuditHead.hash)).where(col(AuditHead.id) == HEAD_ID)
    row = session.execute(stmt.with_for_update()).first()
    if row is None:
        _create_head(session, genesis)
        row = session.execute(stmt.with_for_update()).one()
    return int(row.seq), str(row.hash)


def _create_head(session: Session, genesis: str) -> None:
    # Race-safe: concurrent creators conflict on the primary key and all but one do nothing.
    values = {"id": HEAD_ID, "seq": 0, "hash": genesis}
    conn = session.connection()
    if is_postgres(conn.engine):
        stmt: Any = pg_insert(AuditHead).values(values).on_conflict_do_nothing()
    else:
        stmt = sqlite_insert(AuditHead).values(values).on_conflict_do_nothing()
    # RETURNING, not rowcount: psycopg reports -1 for this statement under SQLAlchemy 2.1.
    if conn.execute(stmt.returning(col(AuditHead.id))).first() is None:
        return
    if session.execute(select(col(AuditEvent.seq)).limit(1)).first() is not None:
        raise AuditError(None, "audit head is missing while events exist; refusing to restart "
                               "the chain")


def append_rows(session: Session, rows: list[dict[str, Any]], seq: int, head_hash: str) -> None:
    """Insert chained event rows and move the head to (seq, head_hash), under the head lock."""
    conn = session.connection()
    bulk_insert(conn, AuditEvent.__table__, rows)
    conn.execute(update(AuditHead).where(col(AuditHead.id) == HEAD_ID).values(
        seq=seq, hash=head_hash))


def read_head(session: Session) -> tuple[int, str] | None:
    """Return the head's (seq, hash) without locking it, or None when there is none."""
    row = session.execute(select(col(AuditHead.seq), col(AuditHead.hash)).where(
        col(AuditHead.id) == HEAD_ID)).first()
    return None if row is None else (int(row.seq), str(row.hash))


def hash_at(session: Session, seq: int) -> str | None:
    """Return the stored hash of event ``seq``, if it exists."""
    row = session.execute(select(col(AuditEvent.hash)).where(col(AuditEvent.seq) == seq)).first()
    return None if row is None else str(row.hash)


def has_checkpoint(session: Session, seq: int, key_label: str) -> bool:
    """Return whether event ``seq`` is already signed with this key."""
    return session.execute(select(col(AuditCheckpoint.id)).where(
        col(AuditCheckpoint.seq) == seq, col(AuditCheckpoint.key_label) == key_label)
    ).first() is not None


def add_checkpoint(session: Session, **fields: Any) -> AuditCheckpoint:
    """Store a signed checkpoint and return it with its id."""
    made = AuditCheckpoint(**fields)
    session.add(made)
    session.flush()
    return made


def on_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the session's transaction has committed; forget it on a rollback.

    What the action raises comes out of the commit, after the data is durable.
    """
    if not session.info.get(_LISTENING):
        session.info[_LISTENING] = True
        event.listen(session, "after_commit", _run_pending)
        event.listen(session, "after_rollback", _drop_pending)
    session.info.setdefault(_ON_COMMIT, []).append(action)


def _run_pending(session: Session) -> None:
    for action in session.info.pop(_ON_COMMIT, []):
        action()


def _drop_pending(session: Session) -> None:
    session.info.pop(_ON_COMMIT, None)


def last_checkpoint_seq(session: Session) -> int:
    """Return the highest signed seq (0 when nothing is signed)."""
    return int(session.execute(select(func.max(AuditCheckpoint.seq))).scalar() or 0)


def checkpoints(session: Session) -> list[AuditCheckpoint]:
    """Return every checkpoint by seq."""
    return list(session.execute(
        select(AuditCheckpoint).order_by(col(AuditCheckpoint.seq))).scalars())


def stream_events(session: Session) -> Iterator[Any]:
    """Yield every event row in seq order, in chunks (memory stays flat)."""
    cols = [col(AuditEvent.seq), col(AuditEvent.at), col(AuditEvent.principal),
            col(AuditEvent.role), col(AuditEvent.action), col(AuditEvent.outcome),
            col(AuditEvent.meter_serial), col(AuditEvent.batch_id),
            col(AuditEvent.key_version_id), col(AuditEvent.flow_run_id),
            col(AuditEvent.detail), col(AuditEvent.prev_hash), col(AuditEvent.hash)]
    stmt = select(*cols).order_by(col(AuditEvent.seq)).execution_options(yield_per=STREAM_CHUNK)
    yield from session.execute(stmt)


def recent_events(session: Session, *, limit: int = 50, meter_serial: str | None = None,
                  action: str | None = None) -> list[AuditEvent]:
    """Return the newest events first, optionally of one meter and/or one action."""
    stmt = select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(limit)
    if meter_serial is not None:
        stmt = stmt.where(col(AuditEvent.meter_serial) == meter_serial)
    if action is not None:
        stmt = stmt.where(col(AuditEvent.action) == action)
    return list(session.execute(stmt).scalars())


def details_of(session: Session, actions: Sequence[str], *,
               any_outcome: bool = False) -> list[tuple[str, str]]:
    """Return (action, detail text) of every successful event of these actions (of every
    event with ``any_outcome``), oldest first."""
    stmt = (select(col(AuditEvent.action), col(AuditEvent.detail))
            .where(col(AuditEvent.action).in_(list(actions))).order_by(col(AuditEvent.seq)))
    if not any_outcome:
        stmt = stmt.where(col(AuditEvent.outcome) == "ok")
    return [(str(a), str(d)) for a, d in session.execute(stmt).all()]
