"""Principals: who may act, with which role, under which key, enrolled by whom.

Nothing in a row is trusted by itself: ``lifecycle.principals.verify_principal`` checks the
key, the role and the name against the signed enrolment the row carries (``enrolment``), back
to the anchor outside the inventory.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text, func, select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError


class Principal(SQLModel, table=True):
    name: str = Field(primary_key=True, max_length=128)
    role: str = Field(max_length=32)
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    public_pem: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    fingerprint: str | None = Field(default=None, max_length=64, unique=True, index=True)
    enrolment: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    disabled_by: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


def insert_principal(session: Session, name: str, role: str, *, public_pem: str | None = None,
                     fingerprint: str | None = None,
                     enrolment: str | None = None) -> Principal:
    """Insert a principal inside the caller's transaction.

    Raises:
        InventoryError: a principal of that name exists, or one holds that key.
    """
    if session.get(Principal, name) is not None:
        raise InventoryError(f"principal {name!r} already exists")
    if fingerprint is not None:
        holder = by_fingerprint(session, fingerprint)
        if holder is not None:
            raise InventoryError(f"key {fingerprint} is already enrolled for principal "
                                 f"{holder.name!r}: one key, one principal")
    principal = Principal(name=name, role=role, public_pem=public_pem, fingerprint=fingerprint,
                          enrolment=enrolment)
    session.add(principal)
    session.flush()
    return principal


def get(session: Session, name: str) -> Principal | None:
    """Return the principal of that name, enabled or not."""
    return session.execute(select(Principal).where(col(Principal.name) == name)).scalars().first()


def by_fingerprint(session: Session, fingerprint: str) -> Principal | None:
    """Return the principal enrolled with the key of that fingerprint, if any."""
    return session.execute(select(Principal).where(
        col(Principal.fingerprint) == fingerprint)).scalars().first()


def set_disabled(session: Session, name: str, disabled_by: str) -> None:
    """Disable a principal, recording the requests that did.

    Raises:
        InventoryError: no such principal, or it is disabled already.
    """
    principal = get(session, name)
    if principal is None:
        raise InventoryError(f"no principal {name!r}")
    if principal.disabled:
        raise InventoryError(f"principal {name!r} is disabled already")
    principal.disabled = True
    principal.disabled_by = disabled_by
    session.add(principal)
    session.flush()


def enabled_role(session: Session, name: str) -> str | None:
    """Return the role of an enabled principal, or None when unknown or disabled."""
    row = session.execute(select(col(Principal.role), col(Principal.disabled)).where(
        col(Principal.name) == name)).first()
    if row is None or row.disabled:
        return None
    return str(row.role)


def enabled_with_role(session: Session, role: str) -> list[str]:
    """Return the names of the enabled principals of a role."""
    return list(session.execute(select(col(Principal.name)).where(
        col(Principal.role) == role, col(Principal.disabled).is_(False)).order_by(
        col(Principal.name))).scalars())


def list_principals(session: Session) -> list[Principal]:
    """Return every principal by name."""
    return list(session.execute(select(Principal).order_by(col(Principal.name))).scalars())


def count_principals(session: Session) -> int:
    """Return the number of principals, enabled or not."""
    return int(session.execute(select(func.count()).select_from(Principal)).scalar_one())
