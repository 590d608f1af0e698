"""Token backups: one row per backup generation, so that an older one is never restored unasked."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlmodel import Field, Session, SQLModel

from lifecycle.clock import utcnow


class TokenBackup(SQLModel, table=True):
    __tablename__ = "token_backup"
    generation: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    created_at: datetime = Field(default_factory=utcnow)
    path: str = Field(max_length=1024)
    manifest_sha256: str = Field(max_length=64)


def latest_generation(session: Session) -> int:
    """Return the highest backup generation recorded (0 when none)."""
    return int(session.execute(select(func.max(TokenBackup.generation))).scalar() or 0)
