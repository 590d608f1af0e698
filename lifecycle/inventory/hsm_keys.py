"""Pins of the HSM's long-lived keys: which object, by CKA_ID and check value, each role is.

Recorded when ``meterkeys hsm init`` creates a key, and checked before any process uses the HSM:
a key found by label alone could be a substitute (DESIGN.md: never trusted by label alone).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError


class HsmKey(SQLModel, table=True):
    __tablename__ = "hsm_key"
    role: str = Field(primary_key=True, max_length=64)
    label: str = Field(max_length=128)
    key_id: str = Field(max_length=64)
    check_value: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow)


def get_pin(session: Session, role: str) -> HsmKey | None:
    """Return the pin of a role, if one is recorded."""
    return session.get(HsmKey, role)


def all_pins(session: Session) -> list[HsmKey]:
    """Return every recorded pin, by role."""
    return list(session.execute(select(HsmKey).order_by(col(HsmKey.role))).scalars())


def put_pin(session: Session, role: str, label: str, key_id: str, check_value: str) -> HsmKey:
    """Record the pin of a role; an existing pin is never replaced.

    Raises:
        InventoryError: the role is pinned to another key already.
    """
    known = session.get(HsmKey, role)
    if known is not None:
        if (known.label, known.key_id, known.check_value) != (label, key_id, check_value):
            raise InventoryError(f"HSM key role {role!r} is already pinned to another key "
                                 f"(label {known.label!r}); pins are never replaced")
        return known
    pin = HsmKey(role=role, label=label, key_id=key_id, check_value=check_value)
    session.add(pin)
    session.flush()
    return pin
