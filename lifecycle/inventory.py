"""Inventory: SQLModel tables and queries; the only module that speaks SQL.

A meter's DLMS keys are never HSM token objects: each lives here as a *key blob*, the key
wrapped under the storage KEK (RFC 3394), with its key id, version, state and dates. No column
holds key material in clear, a PIN or a transport key.

SQLite by default (WAL, foreign keys on), PostgreSQL by URL. The schema is created and upgraded
by Alembic (``migrate``), never by ``create_all``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlmodel import Field, Session, SQLModel

from lifecycle.errors import InventoryError


def utcnow() -> datetime:
    """Return the current UTC time (for callers at the edge; policies get the clock passed in)."""
    return datetime.now(UTC)


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


class BatchStatus(StrEnum):
    VERIFIED = "verified"
    IMPORTING = "importing"
    COMPLETED = "completed"
    REJECTED = "rejected"


class Vendor(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    signing_key_pem: str = Field(sa_column=Column(Text, nullable=False))
    import_key_label: str | None = Field(default=None, max_length=128)
    oaep_hash: str | None = Field(default=None, max_length=16)
    mapping: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


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


class KeyVersion(SQLModel, table=True):
    __tablename__ = "key_version"
    __table_args__ = (UniqueConstraint("meter_id", "key_id", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    meter_id: int = Field(foreign_key="meter.id", index=True)
    key_id: int
    version: int
    state: str = Field(max_length=16, index=True)
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    kek_label: str = Field(max_length=128)
    origin: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    activated_at: datetime | None = None
    expires_at: datetime | None = None
    destroyed_at: datetime | None = None


class QuarantinedRow(SQLModel, table=True):
    __tablename__ = "quarantined_row"
    __table_args__ = (UniqueConstraint("batch_id", "row", "field"),)
    id: int | None = Field(default=None, primary_key=True)
    batch_id: int = Field(foreign_key="import_batch.id", index=True)
    row: int
    field: str = Field(max_length=64)
    reason: str = Field(max_length=512)
    serial: str | None = Field(default=None, max_length=64)


class Principal(SQLModel, table=True):
    name: str = Field(primary_key=True, max_length=128)
    role: str = Field(max_length=32)
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"
    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    at: datetime
    principal: str = Field(max_length=128)
    role: str | None = Field(default=None, max_length=32)
    action: str = Field(max_length=64, index=True)
    outcome: str = Field(max_length=16)
    meter_serial: str | None = Field(default=None, max_length=64, index=True)
    batch_id: int | None = Field(default=None, index=True)
    key_version_id: int | None = None
    flow_run_id: str | None = Field(default=None, max_length=64)
    detail: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """Singleton row: the chain head. Appending locks it, so the chain stays linear."""

    __tablename__ = "audit_head"
    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str = Field(max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    __tablename__ = "audit_checkpoint"
    id: int | None = Field(default=None, primary_key=True)
    seq: int = Field(index=True)
    head_hash: str = Field(max_length=64)
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    key_label: str = Field(max_length=128)
    at: datetime


class KekCheck(SQLModel, table=True):
    """A canary blob wrapped under a storage KEK: proves a restored token holds that KEK."""

    __tablename__ = "kek_check"
    label: str = Field(primary_key=True, max_length=128)
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


# --- engine and sessions -----------------------------------------------------------
def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()
            # Take the write lock at BEGIN, so that concurrent writers queue instead of failing
            # on lock upgrade (pysqlite's own BEGIN handling is switched off).
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True)


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """Yield a session inside one transaction: committed on success, rolled back on error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the latest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    here = Path(__file__).parent / "migrations"
    config = Config()
    config.set_main_option("script_location", str(here))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


# --- vendors -----------------------------------------------------------
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


# --- batches -----------------------------------------------------------
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


def get_batch(session: Session, batch_id: int) -> ImportBatch:
    """Return a batch by id.

    Raises:
        InventoryError: no such batch.
    """
    batch = session.get(ImportBatch, batch_id)
    if batch is None:
        raise InventoryError(f"unknown import batch {batch_id}")
    return batch


def existing_meters(session: Session, serials: Sequence[str], titles: Sequence[str]
                    ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Return the known serials and system titles among the given ones.

    Each maps to (batch id, source row) of the meter that holds it.
    """
    by_serial: dict[str, tuple[int, int]] = {}
    by_title: dict[str, tuple[int, int]] = {}
    cols = (Meter.serial, Meter.system_title, Meter.batch_id, Meter.source_row)
    for part in _slices(list(serials)):
        for serial, _title, batch, row in session.execute(
                select(*cols).where(Meter.serial.in_(part))):
            by_serial[serial] = (batch, row)
    for part in _slices(list(titles)):
        for _serial, title, batch, row in session.execute(
                select(*cols).where(Meter.system_title.in_(part))):
            by_title[title] = (batch, row)
    return by_serial, by_title


def _slices(items: list[str], size: int = 900) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


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


# SQLAlchemy's own storage format for DateTime on SQLite (sqlalchemy.dialects.sqlite.DATETIME).
_SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"


def bulk_insert(conn: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert many rows of the same shape in one round trip.

    On SQLite the rows go straight to the driver's ``executemany``, values converted as
    SQLAlchemy would store them (UTC datetimes in its text format): per-row parameter
    processing cost more than the insert itself. Elsewhere SQLAlchemy's executemany is used.
    """
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(insert(table), rows)
        return
    names = list(rows[0])
    unknown = set(names) - set(table.c.keys())
    if unknown:
        raise InventoryError(f"{table.name} has no columns {sorted(unknown)}")
    # Identifiers are the table's own column names (checked above); values are bound.
    sql = (f"INSERT INTO {table.name} ({', '.join(names)}) "  # noqa: S608
           f"VALUES ({', '.join('?' for _ in names)})")
    columns = []
    for name in names:
        convert = _sqlite_converter(table.c[name].type)
        values = [row[name] for row in rows]
        columns.append([convert(v) for v in values] if convert else values)
    conn.exec_driver_sql(sql, list(zip(*columns, strict=True)))


def _sqlite_converter(kind: Any) -> Any:
    # SQLModel wraps its types (UTCDateTime, AutoString) in TypeDecorators: look at the impl,
    # and do what their bind processing does (aware datetimes to naive UTC).
    kind = kind.impl if isinstance(kind, TypeDecorator) else kind
    if isinstance(kind, DateTime):
        return _sqlite_datetime
    if isinstance(kind, Boolean):
        return lambda v: None if v is None else int(v)
    if isinstance(kind, String):
        return lambda v: v if v is None or type(v) is str else str(v)
    return None


@functools.lru_cache(maxsize=256)
def _sqlite_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime(_SQLITE_DATETIME)


def quarantine(session: Session, batch_id: int,
               rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Record rejected rows of a batch once each (a re-run does not duplicate); return new ones."""
    if not rows:
        return []
    seen = {(r, f) for r, f in session.execute(
        select(QuarantinedRow.row, QuarantinedRow.field).where(
            QuarantinedRow.batch_id == batch_id,
            QuarantinedRow.row.in_([r["row"] for r in rows])))}
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


def batch_counts(session: Session, batch_id: int) -> tuple[int, int]:
    """Return (meters imported, rows quarantined) of a batch, counted from the tables."""
    imported = session.execute(select(func.count()).select_from(Meter).where(
        Meter.batch_id == batch_id)).scalar_one()
    rejected = session.execute(select(func.count(func.distinct(QuarantinedRow.row))).where(
        QuarantinedRow.batch_id == batch_id)).scalar_one()
    return int(imported), int(rejected)


def quarantine_list(session: Session, batch_id: int) -> list[QuarantinedRow]:
    """Return the quarantined rows of a batch in file order."""
    stmt = select(QuarantinedRow).where(QuarantinedRow.batch_id == batch_id).order_by(
        QuarantinedRow.row, QuarantinedRow.field)
    return list(session.execute(stmt).scalars())


def suite_counts(session: Session, batch_id: int) -> dict[int, int]:
    """Return the number of imported meters of a batch per DLMS suite."""
    stmt = select(Meter.suite, func.count()).where(Meter.batch_id == batch_id).group_by(
        Meter.suite)
    return {int(suite): int(n) for suite, n in session.execute(stmt)}


# --- meters -----------------------------------------------------------
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
    return int(session.execute(select(func.count()).select_from(Meter)).scalar_one())


def sample_blobs(session: Session, kek_label: str, limit: int = 8) -> list[bytes]:
    """Return up to ``limit`` key blobs wrapped under the given KEK (for known-answer checks)."""
    stmt = select(KeyVersion.blob).where(KeyVersion.kek_label == kek_label).limit(limit)
    return [bytes(b) for (b,) in session.execute(stmt)]


def get_kek_check(session: Session, label: str) -> KekCheck | None:
    return session.get(KekCheck, label)


def put_kek_check(session: Session, label: str, blob: bytes) -> None:
    """Store the canary blob of a KEK unless one is stored."""
    if session.get(KekCheck, label) is None:
        session.add(KekCheck(label=label, blob=blob))
