"""Deliveries (import batches) and their quarantined rows."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import UniqueConstraint, func, select
from sqlmodel import Field, Session, SQLModel

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError
from lifecycle.inventory.db import among, bulk_insert


class BatchStatus(StrEnum):
    VERIFIED = "verified"
    IMPORTING = "importing"
    COMPLETED = "completed"
    REJECTED = "rejected"


class ImportBatch(SQLModel, table=True):
    __tablename__ = "import_batch"
    # A batch is its data file *and* its manifest: a data file re-delivered with a corrected
    # manifest (another transport key wrap, say) is a new delivery.
    __table_args__ = (UniqueConstraint("vendor_id", "file_sha256", "manifest_sha256",
                                       name="uq_import_batch_delivery"),)
    id: int | None = Field(default=None, primary_key=True)
    vendor_id: int = Field(foreign_key="vendor.id", index=True)
    file_name: str = Field(max_length=512)
    file_sha256: str = Field(max_length=64)
    manifest_sha256: str = Field(default="", max_length=64)
    batch_ref: str = Field(max_length=128)
    record_count: int
    status: str = Field(default=BatchStatus.VERIFIED, max_length=16)
    imported: int = 0
    quarantined: int = 0
    flow_run_id: str | None = Field(default=None, max_length=64)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class QuarantinedRow(SQLModel, table=True):
    __tablename__ = "quarantined_row"
    __table_args__ = (UniqueConstraint("batch_id", "row", "field"),)
    id: int | None = Field(default=None, primary_key=True)
    batch_id: int = Field(foreign_key="import_batch.id", index=True)
    row: int
    field: str = Field(max_length=64)
    reason: str = Field(max_length=512)
    serial: str | None = Field(default=None, max_length=64)


def find_batch(session: Session, vendor_id: int, sha256: str,
               manifest_sha256: str | None = None) -> ImportBatch | None:
    """Return the delivery of this vendor with this data file (and manifest), if seen before.

    Without ``manifest_sha256``, the latest delivery of the data file is returned.
    """
    stmt = select(ImportBatch).where(ImportBatch.vendor_id == vendor_id,
                                     ImportBatch.file_sha256 == sha256)
    if manifest_sha256 is not None:
        stmt = stmt.where(ImportBatch.manifest_sha256 == manifest_sha256)
    return session.execute(stmt.order_by(ImportBatch.id.desc())).scalars().first()


def add_batch(session: Session, **fields: Any) -> ImportBatch:
    """Register a delivery and return it with its id."""
    record = ImportBatch(**fields)
    session.add(record)
    session.flush()
    return record


def get_batch(session: Session, batch_id: int) -> ImportBatch:
    """Return a batch by id.

    Raises:
        InventoryError: no such batch.
    """
    batch = session.get(ImportBatch, batch_id)
    if batch is None:
        raise InventoryError(f"unknown import batch {batch_id}")
    return batch


def quarantine(session: Session, batch_id: int,
               rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Record rejected rows of a batch once each (a re-run does not duplicate); return new ones."""
    if not rows:
        return []
    seen = {(r, f) for r, f in session.execute(
        select(QuarantinedRow.row, QuarantinedRow.field).where(
            QuarantinedRow.batch_id == batch_id,
            among(session, QuarantinedRow.row, [r["row"] for r in rows])))}
    fresh = [dict(r, batch_id=batch_id) for r in rows if (r["row"], r["field"]) not in seen]
    if fresh:
        bulk_insert(session.connection(), QuarantinedRow.__table__, fresh)
    return fresh


def bump_batch(session: Session, batch_id: int, imported: int, quarantined: int) -> None:
    """Add a chunk's counts to its batch (read by progress displays)."""
    session.connection().execute(
        ImportBatch.__table__.update().where(ImportBatch.__table__.c.id == batch_id).values(
            imported=ImportBatch.__table__.c.imported + imported,
            quarantined=ImportBatch.__table__.c.quarantined + quarantined))


def quarantine_list(session: Session, batch_id: int) -> list[QuarantinedRow]:
    """Return the quarantined rows of a batch in file order."""
    stmt = select(QuarantinedRow).where(QuarantinedRow.batch_id == batch_id).order_by(
        QuarantinedRow.row, QuarantinedRow.field)
    return list(session.execute(stmt).scalars())


def rejected_count(session: Session, batch_id: int) -> int:
    """Return the number of distinct rows of a batch in quarantine."""
    return int(session.execute(select(func.count(func.distinct(QuarantinedRow.row))).where(
        QuarantinedRow.batch_id == batch_id)).scalar_one())
