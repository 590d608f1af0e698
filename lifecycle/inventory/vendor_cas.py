"""Manufacturers' factory CA certificates: what a meter's factory certificate must chain to.

Registered by two security officers (``meterkeys vendor add-ca``); stored as DER with their
SHA-256 fingerprint, which is unique: one certificate belongs to one vendor.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, LargeBinary, String, Text, select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError


class VendorCa(SQLModel, table=True):
    __tablename__ = "vendor_ca"
    id: int | None = Field(default=None, primary_key=True)
    vendor_id: int = Field(foreign_key="vendor.id", index=True)
    fingerprint: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    subject: str = Field(sa_column=Column(Text, nullable=False))
    curve: str = Field(max_length=16)
    not_before: datetime
    not_after: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    added_at: datetime = Field(default_factory=utcnow)


def add_vendor_ca(session: Session, record: VendorCa) -> VendorCa:
    """Register a factory CA certificate.

    Raises:
        InventoryError: the certificate is registered already (for this or another vendor).
    """
    known = session.execute(select(VendorCa.id).where(
        VendorCa.fingerprint == record.fingerprint)).first()
    if known is not None:
        raise InventoryError(f"factory CA certificate SHA-256 {record.fingerprint[:16]}… is "
                             "registered already")
    session.add(record)
    session.flush()
    return record


def vendor_cas(session: Session, vendor_id: int) -> list[VendorCa]:
    """Return a vendor's factory CA certificates, oldest first."""
    return list(session.execute(select(VendorCa).where(VendorCa.vendor_id == vendor_id)
                                .order_by(col(VendorCa.id))).scalars())


__all__ = ["VendorCa", "add_vendor_ca", "vendor_cas"]
