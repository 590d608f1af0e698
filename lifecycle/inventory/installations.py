"""The installation's identity: one random UUID, made when the schema is created and kept.

What an audit checkpoint signs names it (``lifecycle.audit.chain.checkpoint_digest``), and the
audit witness's header records it, so a checkpoint of one installation never verifies in
another, and an inventory whose identity was replaced or deleted no longer matches its witness.
Migration 0004 inserts the row; nothing in meterkeys writes it afterwards.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.clock import utcnow
from lifecycle.errors import AuditError


class Installation(SQLModel, table=True):
    __tablename__ = "installation"
    id: str = Field(primary_key=True, max_length=36)
    created_at: datetime = Field(default_factory=utcnow)


def installation_id(session: Session) -> str | None:
    """Return the installation's id, or None when the row is gone.

    Raises:
        AuditError: several rows claim to be the installation (seq None).
    """
    ids = list(session.execute(select(col(Installation.id)).limit(2)).scalars())
    if len(ids) > 1:
        raise AuditError(None, "the inventory holds several installation ids; there is one")
    return ids[0] if ids else None
