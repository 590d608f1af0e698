"""Principals: who may act, with which role."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError


class Principal(SQLModel, table=True):
    name: str = Field(primary_key=True, max_length=128)
    role: str = Field(max_length=32)
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow)


def insert_principal(session: Session, name: str, role: str) -> Principal:
    """Insert a principal inside the caller's transaction.

    Raises:
        InventoryError: a principal of that name exists.
    """
    if session.get(Principal, name) is not None:
        raise InventoryError(f"principal {name!r} already exists")
    principal = Principal(name=name, role=role)
    session.add(principal)
    session.flush()
    return principal


def enabled_role(session: Session, name: str) -> str | None:
    """Return the role of an enabled principal, or None when unknown or disabled."""
    row = session.execute(select(col(Principal.role), col(Principal.disabled)).where(
        col(Principal.name) == name)).first()
    if row is None or row.disabled:
        return None
    return str(row.role)


def list_principals(session: Session) -> list[Principal]:
    """Return every principal by name."""
    return list(session.execute(select(Principal).order_by(col(Principal.name))).scalars())


def count_principals(session: Session) -> int:
    """Return the number of principals, enabled or not."""
    return int(session.execute(select(func.count()).select_from(Principal)).scalar_one())
