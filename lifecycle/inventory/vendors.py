"""Vendors: manufacturers, their manifest signing keys, mappings and the DSO's import keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, String, Text, select
from sqlmodel import Field, Session, SQLModel

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError


class Vendor(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    signing_key_pem: str = Field(sa_column=Column(Text, nullable=False))
    import_key_label: str | None = Field(default=None, max_length=128)
    oaep_hash: str | None = Field(default=None, max_length=16)
    mapping: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


def get_vendor(session: Session, name: str) -> Vendor:
    """Return the vendor by name.

    Raises:
        InventoryError: no such vendor.
    """
    vendor = session.execute(select(Vendor).where(Vendor.name == name)).scalars().first()
    if vendor is None:
        raise InventoryError(f"unknown vendor {name!r}: onboard it with meterkeys vendor add")
    return vendor


def list_vendors(session: Session) -> list[Vendor]:
    """Return every vendor by name."""
    return list(session.execute(select(Vendor).order_by(Vendor.name)).scalars())


def add_vendor(session: Session, name: str, signing_key_pem: str, mapping: str | None) -> Vendor:
    """Register a vendor with its manufacturer signing public key and column mapping.

    Raises:
        InventoryError: a vendor of that name exists.
    """
    exists = session.execute(select(Vendor.id).where(Vendor.name == name)).first()
    if exists is not None:
        raise InventoryError(f"vendor {name!r} already exists")
    vendor = Vendor(name=name, signing_key_pem=signing_key_pem, mapping=mapping)
    session.add(vendor)
    session.flush()
    return vendor


def set_import_key(session: Session, name: str, label: str, oaep_hash: str) -> None:
    """Record the label and OAEP hash of a vendor's import key.

    Raises:
        InventoryError: no such vendor.
    """
    record = get_vendor(session, name)
    record.import_key_label, record.oaep_hash = label, oaep_hash
    session.add(record)
