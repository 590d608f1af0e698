"""Token backups: one row per backup generation, so that an older one is never restored unasked.

A backup's signed manifest carries its generation; a restore compares it with the latest one
recorded here and with the manifest digest recorded for it (``lifecycle.installation.rules``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlmodel import Field, Session, SQLModel

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError


class TokenBackup(SQLModel, table=True):
    __tablename__ = "token_backup"
    generation: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    created_at: datetime = Field(default_factory=utcnow)
    path: str = Field(max_length=1024)
    manifest_sha256: str = Field(max_length=64)


def latest_generation(session: Session) -> int:
    """Return the highest backup generation recorded (0 when none)."""
    return int(session.execute(select(func.max(TokenBackup.generation))).scalar() or 0)


def get_backup(session: Session, generation: int) -> TokenBackup | None:
    """Return the record of a backup generation, if one exists."""
    return session.get(TokenBackup, generation)


def next_generation(session: Session) -> int:
    """Return the generation the next backup takes: the last recorded one plus one."""
    return latest_generation(session) + 1


def record_backup(session: Session, generation: int, path: str, manifest_sha256: str,
                  created_at: datetime) -> TokenBackup:
    """Record a backup generation; a generation is recorded once.

    Raises:
        InventoryError: the generation is recorded already (another backup took it).
    """
    if session.get(TokenBackup, generation) is not None:
        raise InventoryError(f"token backup generation {generation} is recorded already")
    row = TokenBackup(generation=generation, created_at=created_at, path=path,
                      manifest_sha256=manifest_sha256)
    session.add(row)
    session.flush()
    return row
