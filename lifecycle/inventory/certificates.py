"""The DSO's PKI in the inventory: CA certificates, issued certificates and CRLs.

Certificates and CRLs are public: they are stored as DER. The CA keys they certify live in the
HSM and are pinned in ``hsm_key`` (role ``ca:<name>:<generation>``); the root's key, on a token
of its own, is pinned by its certificate (``key_id`` and the certificate's public key). Serial
numbers are stored in decimal text: 159-bit integers fit no portable integer column.

A CA generation is ``active`` (the newest: it issues), ``retired`` (renewed: it still signs
the CRL of what it issued) or ``revoked`` (by a ceremony: the root's CRL lists it; it neither
issues nor signs anything more).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, LargeBinary, String, Text, UniqueConstraint, func, select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError
from lifecycle.inventory.audit_events import AuditEvent
from lifecycle.inventory.db import bulk_insert

ACTIVE, RETIRED, REVOKED = "active", "retired", "revoked"


class CaCertificate(SQLModel, table=True):
    __tablename__ = "ca_certificate"
    __table_args__ = (UniqueConstraint("ca_name", "generation"),)
    id: int | None = Field(default=None, primary_key=True)
    ca_name: str = Field(max_length=32, index=True)
    generation: int
    kind: str = Field(max_length=16)
    curve: str = Field(max_length=8)
    serial: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    subject: str = Field(sa_column=Column(Text, nullable=False))
    not_before: datetime
    not_after: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    key_label: str = Field(max_length=128)
    key_id: str = Field(max_length=64)
    status: str = Field(default=ACTIVE, max_length=16)
    created_at: datetime = Field(default_factory=utcnow)


class IssuedCertificate(SQLModel, table=True):
    __tablename__ = "issued_certificate"
    serial: str = Field(primary_key=True, max_length=64)
    ca_name: str = Field(max_length=32)
    ca_generation: int
    subject: str = Field(max_length=128, index=True)
    meter_serial: str | None = Field(default=None, max_length=64, index=True)
    usage: str = Field(max_length=16)
    not_before: datetime
    not_after: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    revoked_at: datetime | None = None
    revocation_reason: str | None = Field(default=None, max_length=32)


class Crl(SQLModel, table=True):
    __tablename__ = "crl"
    __table_args__ = (UniqueConstraint("ca_name", "generation", "number"),)
    id: int | None = Field(default=None, primary_key=True)
    ca_name: str = Field(max_length=32)
    generation: int
    number: int
    this_update: datetime
    next_update: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


# --- CA certificates ----------------------------------------------------------------------------
def ca_certificates(session: Session, ca_name: str | None = None) -> list[CaCertificate]:
    """Return the CA certificates (of one CA, or all), by name and generation."""
    query = select(CaCertificate)
    if ca_name is not None:
        query = query.where(CaCertificate.ca_name == ca_name)
    return list(session.execute(query.order_by(col(CaCertificate.ca_name),
                                               col(CaCertificate.generation))).scalars())


def current_ca(session: Session, ca_name: str) -> CaCertificate | None:
    """Return the active CA certificate of the newest generation of a CA, if any."""
    return session.execute(select(CaCertificate).where(
        CaCertificate.ca_name == ca_name, CaCertificate.status == ACTIVE).order_by(
        col(CaCertificate.generation).desc())).scalars().first()


def newest_ca(session: Session, ca_name: str) -> CaCertificate | None:
    """Return the newest generation of a CA's certificate, whatever its status."""
    return session.execute(select(CaCertificate).where(
        CaCertificate.ca_name == ca_name).order_by(
        col(CaCertificate.generation).desc())).scalars().first()


def ca_generation(session: Session, ca_name: str, generation: int) -> CaCertificate | None:
    """Return one generation of a CA's certificate."""
    return session.execute(select(CaCertificate).where(
        CaCertificate.ca_name == ca_name,
        CaCertificate.generation == generation)).scalars().first()


def add_ca_certificate(session: Session, record: CaCertificate) -> CaCertificate:
    """Store a CA certificate; the previous active generation of the CA is retired (a
    revoked one stays revoked).

    Raises:
        InventoryError: that generation is stored already.
    """
    if ca_generation(session, record.ca_name, record.generation) is not None:
        raise InventoryError(f"CA {record.ca_name} generation {record.generation} is stored "
                             "already")
    for older in ca_certificates(session, record.ca_name):
        if older.status != ACTIVE:
            continue
        older.status = RETIRED
        session.add(older)
    session.add(record)
    session.flush()
    return record


def mark_ca_revoked(session: Session, ca_name: str, generation: int) -> CaCertificate:
    """Mark a CA generation revoked.

    Raises:
        InventoryError: no such generation, or it is revoked already.
    """
    record = ca_generation(session, ca_name, generation)
    if record is None:
        raise InventoryError(f"CA {ca_name} has no generation {generation}")
    if record.status == REVOKED:
        raise InventoryError(f"CA {ca_name} generation {generation} is revoked already")
    record.status = REVOKED
    session.add(record)
    session.flush()
    return record


# --- issued certificates ------------------------------------------------------------------------
def add_issued(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Store issued certificates in one round trip (keys: the columns of ``issued_certificate``).

    Raises:
        sqlalchemy IntegrityError: a serial is stored already (never: serials are random).
    """
    bulk_insert(session.connection(), IssuedCertificate.__table__, list(rows))


def get_issued(session: Session, serial: str) -> IssuedCertificate | None:
    """Return an issued certificate by its decimal serial."""
    return session.get(IssuedCertificate, serial)


def issued_for(session: Session, subject: str) -> list[IssuedCertificate]:
    """Return the certificates issued to a subject (a meter's system title), newest first."""
    return list(session.execute(select(IssuedCertificate).where(
        IssuedCertificate.subject == subject).order_by(
        col(IssuedCertificate.not_before).desc())).scalars())


def revoke(session: Session, serial: str, reason: str, at: datetime) -> IssuedCertificate:
    """Mark an issued certificate revoked.

    Raises:
        InventoryError: no such certificate, or it is revoked already.
    """
    record = session.get(IssuedCertificate, serial, with_for_update=True)
    if record is None:
        raise InventoryError(f"no certificate with serial {serial} was issued here")
    if record.revoked_at is not None:
        raise InventoryError(f"certificate {serial} is revoked already "
                             f"({record.revocation_reason})")
    record.revoked_at, record.revocation_reason = at, reason
    session.add(record)
    session.flush()
    return record


def revoked_by(session: Session, ca_name: str, generation: int,
               now: datetime) -> list[IssuedCertificate]:
    """Return what one CA generation revoked and has not expired yet (RFC 5280 §3.3: an
    expired certificate may leave the CRL)."""
    return list(session.execute(select(IssuedCertificate).where(
        IssuedCertificate.ca_name == ca_name, IssuedCertificate.ca_generation == generation,
        col(IssuedCertificate.revoked_at).is_not(None),
        IssuedCertificate.not_after > now).order_by(col(IssuedCertificate.serial))).scalars())


def count_issued(session: Session, ca_name: str | None = None) -> int:
    """Return how many certificates were issued (by one CA, or all)."""
    query = select(func.count()).select_from(IssuedCertificate)
    if ca_name is not None:
        query = query.where(IssuedCertificate.ca_name == ca_name)
    return int(session.execute(query).scalar_one())


# --- CRLs ---------------------------------------------------------------------------------------
def last_crl(session: Session, ca_name: str, generation: int) -> Crl | None:
    """Return the CRL with the highest number of a CA generation."""
    return session.execute(select(Crl).where(
        Crl.ca_name == ca_name, Crl.generation == generation).order_by(
        col(Crl.number).desc())).scalars().first()


def add_crl(session: Session, record: Crl) -> Crl:
    """Store a CRL; its number must exceed every earlier one of the CA generation.

    Raises:
        InventoryError: the number does not increase (RFC 5280 §5.2.3).
    """
    last = last_crl(session, record.ca_name, record.generation)
    if last is not None and record.number <= last.number:
        raise InventoryError(f"CRL number {record.number} of {record.ca_name} generation "
                             f"{record.generation} does not exceed {last.number}")
    session.add(record)
    session.flush()
    return record


# --- the audit trail's word on the PKI ---------------------------------------------------------
def trail_events(session: Session, actions: Sequence[str]) -> list[tuple[str, datetime, str]]:
    """Return (action, time, detail text) of every successful event of these actions, oldest
    first (the PKI checks what the inventory holds against them)."""
    stmt = (select(col(AuditEvent.action), col(AuditEvent.at), col(AuditEvent.detail))
            .where(col(AuditEvent.action).in_(list(actions)), col(AuditEvent.outcome) == "ok")
            .order_by(col(AuditEvent.seq)))
    return [(str(a), at, str(d)) for a, at, d in session.execute(stmt).all()]


__all__ = ["ACTIVE", "RETIRED", "REVOKED", "CaCertificate", "Crl", "IssuedCertificate",
           "add_ca_certificate", "add_crl", "add_issued", "ca_certificates", "ca_generation",
           "count_issued", "current_ca", "get_issued", "issued_for", "last_crl", "mark_ca_revoked",
           "newest_ca", "revoke", "revoked_by", "trail_events"]
