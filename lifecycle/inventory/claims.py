"""The claim's tables: key orders sent to the HES, and invocation counters per key version.

``claim_order`` holds each order of each attempt: its kind (``lifecycle.claim.rules``), the
key_data (keys wrapped under a meter master key: never a key in clear; kept so that a retry
re-sends the same pending keys with a fresh challenge), the challenge (not secret), its status
and what its outcome showed. An order's status is a record, never evidence: key versions change
only after a proof checked in the HSM. ``invocation_counter`` keeps the last counter accepted
per key version (DLMS Green Book §9.2.7.2.4.1: a counter is never accepted twice).
``certificate_order`` holds the operational certificates issued to a claimed meter (their
serials, decimal; the certificates are in ``issued_certificate``) until the HES has put them on
the meter (``delivered``): a run killed between issuing and delivery delivers them on the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Column,
    Index,
    LargeBinary,
    Text,
    bindparam,
    case,
    exists,
    func,
    literal,
    null,
    select,
    update,
)
from sqlmodel import Field, Session, SQLModel

from lifecycle.clock import utcnow
from lifecycle.inventory.db import among, bulk_insert, is_postgres, slices
from lifecycle.inventory.meters import KeyState, KeyVersion, Meter
from lifecycle.inventory.vendors import Vendor


class ClaimOrder(SQLModel, table=True):
    __tablename__ = "claim_order"
    __table_args__ = (Index("ix_claim_order_meter_status", "meter_id", "status"),)
    order_id: str = Field(primary_key=True, max_length=32)
    meter_id: int = Field(foreign_key="meter.id", index=True)
    attempt: int
    kind: str = Field(max_length=16)
    key_data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    challenge: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    status: str = Field(max_length=16, index=True)
    hes_status: str | None = Field(default=None, max_length=16)
    verdict: str | None = Field(default=None, max_length=16)
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)
    settled_at: datetime | None = None


class InvocationCounter(SQLModel, table=True):
    __tablename__ = "invocation_counter"
    key_version_id: int = Field(primary_key=True, foreign_key="key_version.id")
    last_ic: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow)


class CertificateOrder(SQLModel, table=True):
    __tablename__ = "certificate_order"
    order_id: str = Field(primary_key=True, max_length=32)
    meter_id: int = Field(foreign_key="meter.id", index=True)
    signature_serial: str = Field(max_length=64)
    key_agreement_serial: str = Field(max_length=64)
    status: str = Field(max_length=16, index=True)  # pending | delivered
    created_at: datetime = Field(default_factory=utcnow)
    delivered_at: datetime | None = None


def select_meter_ids(session: Session, *, batch_id: int | None = None,
                     vendor: str | None = None, serials: Sequence[str] = (),
                     states: Sequence[str] = (), suites: Sequence[int] = (),
                     no_certificate_order: str | None = None) -> list[int]:
    """Return the ids of the meters of a batch, a vendor or a list of serials (in ``states``,
    of ``suites``; with ``no_certificate_order``, only those without a certificate order in
    that status), ordered by serial."""
    stmt = select(Meter.id).order_by(Meter.serial)
    if batch_id is not None:
        stmt = stmt.where(Meter.batch_id == batch_id)
    if vendor is not None:
        stmt = stmt.join(Vendor, Vendor.id == Meter.vendor_id).where(Vendor.name == vendor)
    if states:
        stmt = stmt.where(Meter.state.in_(list(states)))
    if suites:
        stmt = stmt.where(Meter.suite.in_(list(suites)))
    if no_certificate_order is not None:
        orders = CertificateOrder.__table__.c
        stmt = stmt.where(~exists().where(orders.meter_id == Meter.id,
                                          orders.status == no_certificate_order))
    if not serials:
        return [int(i) for (i,) in session.execute(stmt)]
    found: list[int] = []
    for part in slices(list(serials)):
        found += [int(i) for (i,) in
                  session.execute(stmt.where(among(session, Meter.serial, part)))]
    return found


class MeterRow(Protocol):
    """The columns of a meter that the claim reads: a row, not an ORM object (a chunk is
    thousands of meters, and building ORM objects was most of its load time)."""

    @property
    def id(self) -> int: ...
    @property
    def serial(self) -> str: ...
    @property
    def system_title(self) -> str: ...
    @property
    def suite(self) -> int: ...
    @property
    def vendor_id(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def factory_certificate(self) -> str | None: ...


class KeyRow(Protocol):
    """The columns of a key version that the claim reads (a row, as ``MeterRow``)."""

    @property
    def id(self) -> int: ...
    @property
    def meter_id(self) -> int: ...
    @property
    def key_id(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def blob(self) -> bytes: ...
    @property
    def mac(self) -> bytes | None: ...


def meter_rows(session: Session, ids: Sequence[int]) -> list[MeterRow]:
    """Return the claim's columns of meters by id, ordered by serial."""
    t = Meter.__table__.c
    stmt = select(t.id, t.serial, t.system_title, t.suite, t.vendor_id, t.state,
                  t.factory_certificate)
    out: list[Any] = []
    for part in _id_slices(ids):
        out += session.execute(stmt.where(among(session, t.id, part))).all()
    return cast(list[MeterRow], sorted(out, key=lambda m: m.serial))


def key_rows_of(session: Session, meter_ids: Sequence[int],
                blobs_of: int | None) -> dict[int, list[KeyRow]]:
    """Return the claim's columns of each meter's key versions, by key id then version. Only
    the versions of key ``blobs_of`` carry ``blob`` and ``mac`` (a step uses one key's); the
    others' are None, all of them with ``blobs_of=None`` (for a caller that reads states)."""
    t = KeyVersion.__table__.c
    wrapped = (case((t.key_id == blobs_of, t.blob), else_=null()).label("blob"),
               case((t.key_id == blobs_of, t.mac), else_=null()).label("mac")) \
        if blobs_of is not None else (null().label("blob"), null().label("mac"))
    stmt = select(t.id, t.meter_id, t.key_id, t.version, t.state, *wrapped)
    out: dict[int, list[KeyRow]] = {int(i): [] for i in meter_ids}
    for part in _id_slices(meter_ids):
        for key in session.execute(stmt.where(among(session, t.meter_id, part)).order_by(
                t.meter_id, t.key_id, t.version)).all():
            out[key.meter_id].append(cast(KeyRow, key))
    return out


def meters_by_id(session: Session, ids: Sequence[int]) -> list[Meter]:
    """Return meters by id, ordered by serial."""
    out: list[Meter] = []
    for part in _id_slices(ids):
        out += session.execute(select(Meter).where(among(session, Meter.id, part))).scalars()
    return sorted(out, key=lambda m: m.serial)


def key_versions_of(session: Session, meter_ids: Sequence[int]) -> dict[int, list[KeyVersion]]:
    """Return the key versions of each meter, by key id then version."""
    out: dict[int, list[KeyVersion]] = {int(i): [] for i in meter_ids}
    for part in _id_slices(meter_ids):
        stmt = select(KeyVersion).where(among(session, KeyVersion.meter_id, part)).order_by(
            KeyVersion.meter_id, KeyVersion.key_id, KeyVersion.version)
        for key in session.execute(stmt).scalars():
            out[key.meter_id].append(key)
    return out


def insert_key_versions(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert key versions (pending ones: the partial unique index refuses a second pending
    version of one key)."""
    bulk_insert(session.connection(), KeyVersion.__table__, rows)


def add_orders(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert claim orders."""
    bulk_insert(session.connection(), ClaimOrder.__table__, rows)


def get_order(session: Session, order_id: str) -> ClaimOrder | None:
    """Return an order, or None."""
    return session.get(ClaimOrder, order_id)


class OrderRow(Protocol):
    """The columns of an order that the claim reads (a row, as ``MeterRow``)."""

    @property
    def order_id(self) -> str: ...
    @property
    def meter_id(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def hes_status(self) -> str | None: ...
    @property
    def key_data(self) -> bytes: ...
    @property
    def challenge(self) -> bytes: ...


def _order_columns(key_data: bool = True, challenge: bool = True) -> tuple[Any, ...]:
    t = ClaimOrder.__table__.c
    return (t.order_id, t.meter_id, t.attempt, t.kind, t.status, t.hes_status,
            t.key_data if key_data else null().label("key_data"),
            t.challenge if challenge else null().label("challenge"))


def orders_by_id(session: Session, order_ids: Sequence[str],
                 challenge: bool = True) -> dict[str, OrderRow]:
    """Return the known orders among the given ids (rows, not ORM objects: a chunk is
    thousands of orders, and building objects was most of its cost). ``key_data`` is None:
    settling an outcome never needs the keys sent; ``challenge`` too with ``challenge=False``."""
    t = ClaimOrder.__table__.c
    out: dict[str, OrderRow] = {}
    columns = _order_columns(key_data=False, challenge=challenge)
    for part in slices(list(order_ids)):
        for order in session.execute(select(*columns).where(
                among(session, t.order_id, part))).all():
            out[order.order_id] = cast(OrderRow, order)
    return out


def last_orders(session: Session, meter_ids: Sequence[int]) -> dict[int, list[OrderRow]]:
    """Return each meter's orders of its latest attempt (rows, as ``orders_by_id``)."""
    t = ClaimOrder.__table__
    out: dict[int, list[OrderRow]] = {}
    for part in _id_slices(meter_ids):
        latest = (select(t.c.meter_id, func.max(t.c.attempt).label("attempt"))
                  .where(among(session, t.c.meter_id, part)).group_by(t.c.meter_id).subquery())
        stmt = select(*_order_columns()).join(latest, (latest.c.meter_id == t.c.meter_id)
                                              & (latest.c.attempt == t.c.attempt))
        for order in session.execute(stmt.order_by(t.c.kind)).all():
            out.setdefault(order.meter_id, []).append(cast(OrderRow, order))
    return out


def pending_orders(session: Session, meter_ids: Sequence[int] | None = None) -> list[ClaimOrder]:
    """Return orders waiting for an outcome (of some meters, or all), oldest first."""
    stmt = select(ClaimOrder).where(ClaimOrder.status == "pending")
    if meter_ids is None:
        return list(session.execute(stmt.order_by(ClaimOrder.created_at,
                                                   ClaimOrder.order_id)).scalars())
    out: list[ClaimOrder] = []
    for part in _id_slices(meter_ids):
        out += session.execute(stmt.where(among(session, ClaimOrder.meter_id, part))).scalars()
    return sorted(out, key=lambda o: (o.created_at, o.order_id))


def supersede(session: Session, meter_ids: Sequence[int], at: datetime) -> int:
    """Mark the meters' pending orders superseded (a new attempt replaces them)."""
    t = ClaimOrder.__table__.c
    done = 0
    for part in _id_slices(meter_ids):
        result = session.execute(update(ClaimOrder.__table__).where(
            among(session, t.meter_id, part), t.status == "pending").values(
            status="superseded", settled_at=at))
        done += int(getattr(result, "rowcount", 0) or 0)
    return done


def settle_order(session: Session, order_id: str, *, status: str, hes_status: str | None,
                 verdict: str, detail: str, at: datetime) -> bool:
    """Record an order's outcome, if it is still pending; return whether it was."""
    result = session.execute(update(ClaimOrder).where(
        ClaimOrder.order_id == order_id, ClaimOrder.status == "pending").values(
        status=status, hes_status=hes_status, verdict=verdict, detail=detail, settled_at=at))
    return bool(getattr(result, "rowcount", 0))


def last_counters(session: Session, key_version_ids: Sequence[int]) -> dict[int, int]:
    """Return the last accepted invocation counter of each key version that has one."""
    out: dict[int, int] = {}
    for part in _id_slices(key_version_ids):
        for kv, ic in session.execute(select(InvocationCounter.key_version_id,
                                             InvocationCounter.last_ic).where(
                among(session, InvocationCounter.key_version_id, part))):
            out[int(kv)] = int(ic)
    return out


def put_counter(session: Session, key_version_id: int, ic: int, at: datetime) -> None:
    """Record ``ic`` as the last counter of a key version (the caller checked it is above)."""
    row = session.get(InvocationCounter, key_version_id)
    if row is None:
        session.add(InvocationCounter(key_version_id=key_version_id, last_ic=ic, updated_at=at))
    else:
        row.last_ic, row.updated_at = ic, at
    session.flush()


def put_counters(session: Session, counters: dict[int, int], at: datetime) -> None:
    """Record the last counter of several key versions (the caller checked each is above)."""
    if not counters:
        return
    known = set(last_counters(session, list(counters)))
    if known:  # one statement over all of them (executemany), not one a counter
        t = InvocationCounter.__table__.c
        session.connection().execute(
            update(InvocationCounter.__table__).where(t.key_version_id == bindparam("kv"))
            .values(last_ic=bindparam("ic"), updated_at=at),
            [{"kv": kv, "ic": counters[kv]} for kv in sorted(known)])
    bulk_insert(session.connection(), InvocationCounter.__table__, [
        {"key_version_id": kv, "last_ic": ic, "updated_at": at}
        for kv, ic in counters.items() if kv not in known])


def settle_orders(session: Session, rows: Sequence[dict[str, Any]], at: datetime) -> None:
    """Record several orders' outcomes (``order_id``, ``hes_status``, ``verdict``, ``detail``)
    on the orders still pending, in one statement."""
    if not rows:
        return
    if is_postgres(session.get_bind()):
        _settle_orders_pg(session, rows, at)
        return
    stmt = (update(ClaimOrder.__table__)
            .where(ClaimOrder.__table__.c.order_id == bindparam("oid"),
                   ClaimOrder.__table__.c.status == "pending")
            .values(status="answered", hes_status=bindparam("hs"), verdict=bindparam("vd"),
                    detail=bindparam("dt"), settled_at=at))
    session.connection().execute(stmt, [{"oid": r["order_id"], "hs": r["hes_status"],
                                         "vd": r["verdict"], "dt": r["detail"]} for r in rows])


def _settle_orders_pg(session: Session, rows: Sequence[dict[str, Any]], at: datetime) -> None:
    # One UPDATE ... FROM unnest(arrays) for all the rows: as many statements as rows cost
    # PostgreSQL a parse, a plan and an index probe each (psycopg pipelines them, the server
    # still runs them one by one). An order named twice keeps its first outcome, as the
    # statement per row did (the second found the order no longer pending).
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["order_id"], row)
    t = ClaimOrder.__table__
    columns = {"oid": "order_id", "hs": "hes_status", "vd": "verdict", "dt": "detail"}
    given = func.unnest(*[literal([r[key] for r in first.values()], ARRAY(Text))
                          for key in columns.values()]
                        ).table_valued(*columns).render_derived(name="given")
    session.execute(update(t).where(t.c.order_id == given.c.oid, t.c.status == "pending")
                    .values(status="answered", hes_status=given.c.hs, verdict=given.c.vd,
                            detail=given.c.dt, settled_at=at))


def set_key_states(session: Session, changes: Sequence[tuple[int, str, datetime | None]],
                   at: datetime) -> None:
    """Move key versions ``(id, state, expires_at)`` as ``set_key_state`` does, one UPDATE per
    (state, expiry)."""
    groups: dict[tuple[str, datetime | None], list[int]] = {}
    for kv, state, expires_at in changes:
        groups.setdefault((state, expires_at), []).append(kv)
    for (state, expires_at), ids in groups.items():
        values: dict[str, Any] = {"state": state}
        if state == KeyState.ACTIVE:
            values.update(activated_at=at, expires_at=expires_at)
        if state == KeyState.DESTROYED:
            values.update(blob=b"", mac=None, destroyed_at=at)
        for part in _id_slices(ids):  # Core, not ORM: no session objects to evaluate
            session.execute(update(KeyVersion.__table__).where(
                among(session, KeyVersion.__table__.c.id, part)).values(**values))


def set_key_state(session: Session, key_version_id: int, state: str, at: datetime,
                  expires_at: datetime | None = None) -> None:
    """Move a key version to a state; ``active`` starts its cryptoperiod (until
    ``expires_at``), ``destroyed`` removes its blob and MAC."""
    values: dict[str, Any] = {"state": state}
    if state == KeyState.ACTIVE:
        values.update(activated_at=at, expires_at=expires_at)
    if state == KeyState.DESTROYED:
        values.update(blob=b"", mac=None, destroyed_at=at)
    session.execute(update(KeyVersion).where(KeyVersion.id == key_version_id).values(**values))


def set_meter_state(session: Session, meter_ids: Sequence[int], state: str, at: datetime,
                    *, access_ended: bool = False) -> None:
    """Move meters to a state (``access_ended``: the manufacturer's access ends now)."""
    values: dict[str, Any] = {"state": state, "updated_at": at}
    if access_ended:
        values["manufacturer_access_ended_at"] = at
    for part in _id_slices(meter_ids):
        session.execute(update(Meter.__table__).where(among(session, Meter.__table__.c.id, part))
                        .values(**values))


def count_by_state(session: Session, meter_ids: Sequence[int]) -> dict[str, int]:
    """Return how many of the meters are in each state."""
    out: dict[str, int] = {}
    for part in _id_slices(meter_ids):
        for state, n in session.execute(select(Meter.state, func.count()).where(
                among(session, Meter.id, part)).group_by(Meter.state)):
            out[str(state)] = out.get(str(state), 0) + int(n)
    return out


def _id_slices(ids: Sequence[int]) -> list[list[int]]:
    return list(slices([int(i) for i in ids]))


def add_certificate_orders(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert certificate orders."""
    bulk_insert(session.connection(), CertificateOrder.__table__, rows)


def certificate_orders_of(session: Session,
                          meter_ids: Sequence[int]) -> dict[int, list[CertificateOrder]]:
    """Return each meter's certificate orders, oldest first."""
    out: dict[int, list[CertificateOrder]] = {}
    for part in _id_slices(meter_ids):
        stmt = select(CertificateOrder).where(
            among(session, CertificateOrder.meter_id, part)).order_by(
            CertificateOrder.created_at, CertificateOrder.order_id)
        for order in session.execute(stmt).scalars():
            out.setdefault(order.meter_id, []).append(order)
    return out


def deliver_certificate_orders(session: Session, order_ids: Sequence[str], at: datetime) -> None:
    """Mark certificate orders delivered (the HES took them)."""
    for part in slices(list(order_ids)):
        session.execute(update(CertificateOrder).where(
            among(session, CertificateOrder.order_id, part)).values(status="delivered",
                                                                     delivered_at=at))
