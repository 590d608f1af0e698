"""KEK check values: a canary blob per storage KEK, proving that a token still holds that KEK."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, LargeBinary
from sqlmodel import Field, Session, SQLModel

from lifecycle.clock import utcnow


class KekCheck(SQLModel, table=True):
    """A canary blob wrapped under a storage KEK: proves a restored token holds that KEK."""

    __tablename__ = "kek_check"
    label: str = Field(primary_key=True, max_length=128)
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


def get_kek_check(session: Session, label: str) -> KekCheck | None:
    """Return the canary of a KEK, if one is stored."""
    return session.get(KekCheck, label)


def put_kek_check(session: Session, label: str, blob: bytes) -> None:
    """Store the canary blob of a KEK unless one is stored."""
    if session.get(KekCheck, label) is None:
        session.add(KekCheck(label=label, blob=blob))
