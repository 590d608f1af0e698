"""Meters and their key versions.

A meter's DLMS keys are never HSM token objects: each lives here as a *key blob*, the key
wrapped under the storage KEK (RFC 3394), with its key id, version, state and dates. No column
holds key material in clear, a PIN or a transport key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Column,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlmodel import Field, Session, SQLModel

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError
from lifecycle.inventory.db import among, bulk_insert, slices


class MeterState(StrEnum):
    REGISTERED = "registered"
    CLAIMED = "claimed"
    OPERATIONAL = "operational"
    REMOVED = "removed"


class KeyState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    RETIRED = "retired"
    DESTROYED = "destroyed"


class Meter(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    serial: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    system_title: str = Field(sa_column=Column(String(16), unique=True, nullable=False))
    suite: int
    vendor_id: int = Field(foreign_key="vendor.id", index=True)
    batch_id: int = Field(foreign_key="import_batch.id", index=True)
    source_row: int
    state: str = Field(default=MeterState.REGISTERED, max_length=16, index=True)
    factory_certificate: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    # When the claim proved the DSO's keys on the meter and destroyed the factory keys: from
    # then on the manufacturer holds no key the meter accepts (lifecycle.claim).
    manufacturer_access_ended_at: datetime | None = None


class KeyVersion(SQLModel, table=True):
    __tablename__ = "key_version"
    __table_args__ = (
        UniqueConstraint("meter_id", "key_id", "version"),
        # Never two pending versions of one key (lifecycle.claim.rules): the database holds the
        # rule too, across processes.
        Index("uq_key_version_one_pending", "meter_id", "key_id", unique=True,
              sqlite_where=text("state = 'pending'"), postgresql_where=text("state = 'pending'")),
    )
    id: int | None = Field(default=None, primary_key=True)
    meter_id: int = Field(foreign_key="meter.id", index=True)
    key_id: int
    version: int
    state: str = Field(max_length=16, index=True)
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # CMAC under the HSM's blob MAC key over the blob and what it belongs to (meter, key id,
    # version, KEK): a blob moved to another row or planted does not verify.
    mac: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    # Digest of the vendor's wrapped key (ciphertext), to refuse one key delivered twice.
    source_digest: str | None = Field(default=None, max_length=32, index=True)
    kek_label: str = Field(max_length=128)
    origin: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    activated_at: datetime | None = None
    expires_at: datetime | None = None
    destroyed_at: datetime | None = None


def existing_meters(session: Session, serials: Sequence[str], titles: Sequence[str]
                    ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Return the known serials and system titles among the given ones.

    Each maps to (batch id, source row) of the meter that holds it.
    """
    by_serial: dict[str, tuple[int, int]] = {}
    by_title: dict[str, tuple[int, int]] = {}
    cols = (Meter.serial, Meter.system_title, Meter.batch_id, Meter.source_row)
    for part in slices(list(serials)):
        for serial, _title, batch, row in session.execute(
                select(*cols).where(among(session, Meter.serial, part))):
            by_serial[serial] = (batch, row)
    for part in slices(list(titles)):
        for _serial, title, batch, row in session.execute(
                select(*cols).where(among(session, Meter.system_title, part))):
            by_title[title] = (batch, row)
    return by_serial, by_title


def insert_meters(session: Session, meters: list[dict[str, Any]],
                  keys: list[list[dict[str, Any]]]) -> list[int]:
    """Bulk-insert meters of one batch and, for each, its key versions; return the meter ids.

    ``keys[i]`` are the key-version rows of ``meters[i]`` without ``meter_id``. Every meter
    must carry ``batch_id`` and ``source_row`` (together unique), by which the new ids are read.
    """
    if not meters:
        return []
    conn = session.connection()
    bulk_insert(conn, Meter.__table__, meters)
    rows_of = [m["source_row"] for m in meters]
    found: dict[int, int] = dict(conn.execute(
        select(Meter.source_row, Meter.id).where(
            Meter.batch_id == meters[0]["batch_id"],
            Meter.source_row.between(min(rows_of), max(rows_of)))).all())
    ids = [found[row] for row in rows_of]
    bulk_insert(conn, KeyVersion.__table__,
                [dict(key, meter_id=meter_id) for meter_id, group in zip(ids, keys, strict=True)
                 for key in group])
    return ids


def list_meters(session: Session, *, limit: int = 50, offset: int = 0,
                state: str | None = None) -> list[Meter]:
    """Return meters ordered by serial."""
    stmt = select(Meter).order_by(Meter.serial).offset(offset).limit(limit)
    if state:
        stmt = stmt.where(Meter.state == state)
    return list(session.execute(stmt).scalars())


def get_meter(session: Session, serial: str) -> Meter:
    """Return a meter by serial.

    Raises:
        InventoryError: no such meter.
    """
    meter = session.execute(select(Meter).where(Meter.serial == serial)).scalars().first()
    if meter is None:
        raise InventoryError(f"unknown meter {serial!r}")
    return meter


def key_versions(session: Session, meter_id: int) -> list[KeyVersion]:
    """Return a meter's key versions, by key id then version."""
    stmt = select(KeyVersion).where(KeyVersion.meter_id == meter_id).order_by(
        KeyVersion.key_id, KeyVersion.version)
    return list(session.execute(stmt).scalars())


def count_meters(session: Session) -> int:
    """Return the number of meters in the inventory."""
    return int(session.execute(select(func.count()).select_from(Meter)).scalar_one())


def count_in_batch(session: Session, batch_id: int) -> int:
    """Return the number of meters a batch registered."""
    return int(session.execute(select(func.count()).select_from(Meter).where(
        Meter.batch_id == batch_id)).scalar_one())


def suite_counts(session: Session, batch_id: int) -> dict[int, int]:
    """Return the number of imported meters of a batch per DLMS suite."""
    stmt = select(Meter.suite, func.count()).where(Meter.batch_id == batch_id).group_by(
        Meter.suite)
    return {int(suite): int(n) for suite, n in session.execute(stmt)}


def sample_blobs(session: Session, kek_label: str, limit: int = 8) -> list[bytes]:
    """Return up to ``limit`` key blobs wrapped under the given KEK (for known-answer checks)."""
    stmt = select(KeyVersion.blob).where(KeyVersion.kek_label == kek_label).limit(limit)
    return [bytes(b) for (b,) in session.execute(stmt)]


def count_blobs(session: Session) -> int:
    """Return the number of stored key blobs (a destroyed version has none)."""
    return int(session.execute(select(func.count()).select_from(KeyVersion).where(
        KeyVersion.state != KeyState.DESTROYED)).scalar_one())


def stream_blobs(session: Session, chunk: int = 5000) -> Iterator[Sequence[Any]]:
    """Yield every stored key blob with what it belongs to, in lists of ``chunk`` rows.

    Each row has ``id, serial, system_title, key_id, version, kek_label, blob, mac``; memory
    stays flat however large the inventory. Destroyed versions (the claim empties their blob
    and MAC) are left out.
    """
    stmt = (select(KeyVersion.id, Meter.serial, Meter.system_title, KeyVersion.key_id,
                   KeyVersion.version, KeyVersion.kek_label, KeyVersion.blob, KeyVersion.mac)
            .join(Meter, Meter.id == KeyVersion.meter_id)
            .where(KeyVersion.state != KeyState.DESTROYED)
            .order_by(KeyVersion.id)
            .execution_options(yield_per=chunk))
    yield from session.execute(stmt).partitions(chunk)


def blob_of(session: Session, serial: str, key_id: int, version: int) -> Any:
    """Return one stored blob with what it belongs to (as ``stream_blobs`` rows).

    Raises:
        InventoryError: the meter has no such key version.
    """
    row = session.execute(
        select(KeyVersion.id, Meter.serial, Meter.system_title, KeyVersion.key_id,
               KeyVersion.version, KeyVersion.kek_label, KeyVersion.blob, KeyVersion.mac)
        .join(Meter, Meter.id == KeyVersion.meter_id)
        .where(Meter.serial == serial, KeyVersion.key_id == key_id,
               KeyVersion.version == version)).first()
    if row is None:
        raise InventoryError(f"meter {serial!r} has no key {key_id} version {version}")
    return row


def digest_holders(session: Session, digests: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Return the known source digests among the given ones (wrapped keys delivered before).

    Each maps to (batch id, source row) of the meter whose key version carries it.
    """
    found: dict[str, tuple[int, int]] = {}
    stmt = select(KeyVersion.source_digest, Meter.batch_id, Meter.source_row).join(
        Meter, Meter.id == KeyVersion.meter_id)
    for part in slices(list(dict.fromkeys(digests))):
        for digest, batch, row in session.execute(
                stmt.where(among(session, KeyVersion.source_digest, part))):
            found.setdefault(str(digest), (int(batch), int(row)))
    return found
