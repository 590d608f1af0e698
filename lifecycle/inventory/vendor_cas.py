"""Manufacturers' factory CA certificates: what a meter's factory certificate must chain to.

Registered by two security officers (``meterkeys vendor add-ca``); stored as DER with their
SHA-256 fingerprint, which is unique: one certificate belongs to one vendor. A row is a claim
about trust, not trust itself: anyone who can write the inventory can add one, so
``lifecycle.pki.steps.factory_anchors`` trusts a row only if the audit trail registered it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, LargeBinary, String, Text, select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError
from lifecycle.inventory import audit_events
from lifecycle.inventory.vendors import Vendor


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
    # The registration as two security officers signed it: canonical JSON of the PEM they
    # signed and their signed requests (``lifecycle.pki.steps.add_vendor_ca``).
    registration: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


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


def named_vendor_cas(session: Session, vendor_ids: Sequence[int] | None = None
                     ) -> list[tuple[str, VendorCa]]:
    """Return (vendor name, row) of the factory CA certificates of these vendors (None: every
    vendor), by vendor id then oldest first."""
    stmt = (select(Vendor.name, VendorCa).join(Vendor, col(Vendor.id) == col(VendorCa.vendor_id))
            .order_by(col(VendorCa.vendor_id), col(VendorCa.id)))
    if vendor_ids is not None:
        stmt = stmt.where(col(VendorCa.vendor_id).in_(list(vendor_ids)))
    return [(str(name), row) for name, row in session.execute(stmt).all()]


def registrations(session: Session, action: str) -> list[dict[str, Any]]:
    """Return the details of the audit trail's successful ``action`` events (the registrations
    of factory CAs), oldest first; a detail that is not a JSON object counts as none."""
    found = [json.loads(detail) for _, detail in audit_events.details_of(session, (action,))]
    return [d for d in found if isinstance(d, dict)]


__all__ = ["VendorCa", "add_vendor_ca", "named_vendor_cas", "registrations", "vendor_cas"]
