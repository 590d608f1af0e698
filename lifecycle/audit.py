"""Tamper-evident audit trail: a SHA-256 hash chain anchored by HSM-signed checkpoints.

Every event carries ``hash_n = SHA-256(prev_hash || canonical JSON of its fields)``, where
``prev_hash`` is the lowercase hex of the previous event's hash (64 ASCII characters; 64 zeros for
the first event) and the canonical JSON is ``json.dumps(fields, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` in UTF-8 over ``seq, at, principal, role, action,
outcome, meter_serial, batch_id, key_version_id, flow_run_id, detail``. ``at`` is ISO 8601 in UTC
with microseconds; ``detail`` is the canonical JSON *text* exactly as stored, so any byte changed
in the stored detail breaks the chain.

The ``audit_head`` singleton row (id 1) holds the last (seq, hash). Appending locks it
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serialises writers),
so appenders in many processes produce one linear chain, and events commit atomically with the
data change they describe: they run in the caller's transaction.

The chain alone proves nothing against someone who can rewrite the database: they can rehash
every event after the one they altered. Checkpoints close that gap: ECDSA P-256 signatures, made
in the HSM with the audit key, over ``SHA-256(seq as 8 bytes big-endian || raw 32-byte head
hash)``. Events up to the last checkpoint are anchored; events after it are protected by the
chain only until the next checkpoint (``maybe_checkpoint`` after every ``audit_checkpoint_every``
events, or ``meterkeys audit checkpoint``). ``verify`` takes one public key: checkpoints made with
an earlier audit key fail it (key rotation of the audit key is out of scope here).

Details never hold key material (DESIGN: no plaintext or wrapped key in the database): a detail
is refused when a field name has a word *key*, *keys*, *kek*, *pin*, *blob*, *secret*, *wrapped*,
*password* or *passphrase* (split at ``_``, ``-``, ``.``, spaces and camelCase), unless its last
word marks a reference (``key_id``, ``kek_label``, ``key_version``, ``blob_count``...), and when
a value is bytes or a string containing a run of 32 or more hex digits (an AES-128 key in hex;
this also refuses SHA-256 checksums and undashed UUIDs: name those through ``batch_id`` etc.).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col

from lifecycle.errors import AuditError
from lifecycle.inventory import AuditCheckpoint, AuditEvent, AuditHead, bulk_insert, is_postgres

GENESIS = "0" * 64
HEAD_ID = 1
STREAM_CHUNK = 2000
OUTCOMES = ("ok", "denied", "failed")

_EVENT_FIELDS = ("action", "outcome", "meter_serial", "batch_id", "key_version_id", "detail")
_SECRET_WORDS = frozenset({"key", "keys", "kek", "keks", "pin", "pins", "blob", "blobs", "secret",
                           "secrets", "wrapped", "password", "passphrase"})
_REFERENCE_WORDS = frozenset({"id", "ids", "label", "labels", "version", "versions", "count",
                              "state", "states"})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")


@dataclass(frozen=True)
class Actor:
    """Who performs an action: a principal, its role when known, and the flow run if any."""

    principal: str
    role: str | None
    flow_run_id: str | None = None


class Signer(Protocol):
    """The part of ``lifecycle.hsm.HsmSession`` a checkpoint needs."""

    def sign_ecdsa(self, label: str, digest: bytes) -> bytes: ...


# --- detail --------------------------------------------------------------------------------------
def canonical_detail(detail: Mapping[str, Any] | None) -> str:
    """Return the canonical JSON text of a detail after refusing anything like key material.

    Raises:
        AuditError: a field name or value looks like key material, or is not JSON data (seq None;
            the message names the field, never the value).
    """
    detail = detail or {}
    try:
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError):
        text = None
    # Fast path for the common case (the import writes one event per meter): one regex over
    # the JSON text and cached checks of the field names. Anything suspicious goes through the
    # slow walk, which names the offending field.
    if text is None or _HEX_RUN.search(text) or not _names_ok(detail):
        _check_value("detail", detail)
    assert text is not None
    return text


def _names_ok(value: Any) -> bool:
    if isinstance(value, Mapping):
        return _names_allowed(tuple(value)) and all(
            _names_ok(v) for v in value.values() if isinstance(v, Mapping | list | tuple))
    return all(_names_ok(v) for v in value if isinstance(v, Mapping | list | tuple))


@functools.lru_cache(maxsize=1024)
def _names_allowed(names: tuple[Any, ...]) -> bool:
    try:
        for name in names:
            if not isinstance(name, str):
                return False
            _check_name("", name)
    except AuditError:
        return False
    return True


def _check_value(path: str, value: Any) -> None:
    if isinstance(value, bytes | bytearray | memoryview):
        raise AuditError(None, f"{path}: bytes refused in an audit detail (key material?)")
    if isinstance(value, str):
        if _HEX_RUN.search(value):
            raise AuditError(None, f"{path}: 32 or more hex digits look like key material")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise AuditError(None, f"{path}: not a finite number")
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, Mapping):
        for name, item in value.items():
            if not isinstance(name, str):
                raise AuditError(None, f"{path}: field names must be strings")
            _check_name(f"{path}[{name!r}]", name)
            _check_value(f"{path}[{name!r}]", item)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_value(f"{path}[{index}]", item)
        return
    raise AuditError(None, f"{path}: {type(value).__name__} is not JSON data")


def _check_name(path: str, name: str) -> None:
    if _HEX_RUN.search(name):
        raise AuditError(None, f"{path}: 32 or more hex digits look like key material")
    words = [w.lower() for w in _WORD.findall(name)]
    if words and words[-1] in _REFERENCE_WORDS:
        return
    if _SECRET_WORDS.intersection(words):
        raise AuditError(None, f"{path}: field name looks like key material")


# --- hashing -------------------------------------------------------------------------------------
def _iso(at: datetime) -> str:
    if at.utcoffset() is None:  # a database without time zones returns UTC without an offset
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    """Return the chain hash of an event (stored row or row about to be stored) after prev_hash."""
    fields = {
        "seq": event["seq"], "at": _iso(event["at"]), "principal": event["principal"],
        "role": event["role"], "action": event["action"], "outcome": event["outcome"],
        "meter_serial": event["meter_serial"], "batch_id": event["batch_id"],
        "key_version_id": event["key_version_id"], "flow_run_id": event["flow_run_id"],
        "detail": event["detail"],
    }
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(prev_hash.encode("ascii") + body.encode("utf-8")).hexdigest()


def checkpoint_digest(seq: int, head_hash: str) -> bytes:
    """Return the SHA-256 digest a checkpoint signs: seq (8 bytes big-endian) || head hash."""
    return hashlib.sha256(seq.to_bytes(8, "big") + bytes.fromhex(head_hash)).digest()


# --- head ----------------------------------------------------------------------------------------
def lock_head(session: Session) -> tuple[int, str]:
    """Lock the chain head for this transaction (creating it if missing); return (seq, hash).

    Every appender takes this lock first, so other writers that must serialise with the audit
    trail (principal bootstrap) take it too.

    Raises:
        AuditError: the head row is missing while events exist (seq None).
    """
    stmt = select(col(AuditHead.seq), col(AuditHead.hash)).where(col(AuditHead.id) == HEAD_ID)
    row = session.execute(stmt.with_for_update()).first()
    if row is None:
        _create_head(session)
        row = session.execute(stmt.with_for_update()).one()
    return int(row.seq), str(row.hash)


def _create_head(session: Session) -> None:
    # Race-safe: concurrent creators conflict on the primary key and all but one do nothing.
    values = {"id": HEAD_ID, "seq": 0, "hash": GENESIS}
    conn = session.connection()
    if is_postgres(conn.engine):
        stmt: Any = pg_insert(AuditHead).values(values).on_conflict_do_nothing()
    else:
        stmt = sqlite_insert(AuditHead).values(values).on_conflict_do_nothing()
    # RETURNING, not rowcount: psycopg reports -1 for this statement under SQLAlchemy 2.1.
    if conn.execute(stmt.returning(col(AuditHead.id))).first() is None:
        return
    if session.execute(select(col(AuditEvent.seq)).limit(1)).first() is not None:
        raise AuditError(None, "audit head is missing while events exist; refusing to restart "
                               "the chain")


# --- appending -----------------------------------------------------------------------------------
def record(session: Session, actor: Actor, action: str, outcome: str, *,
           meter_serial: str | None = None, batch_id: int | None = None,
           key_version_id: int | None = None, detail: dict[str, Any] | None = None,
           at: datetime) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction; return it (not attached).

    Raises:
        AuditError: the detail looks like key material, or the head is missing (see lock_head).
        ValueError: ``at`` is naive, or action/outcome is empty.
    """
    row = _prepare(actor, at, {"action": action, "outcome": outcome,
                               "meter_serial": meter_serial, "batch_id": batch_id,
                               "key_version_id": key_version_id, "detail": detail})
    (stored,) = _append(session, [row])
    return AuditEvent(**stored)


def record_many(session: Session, actor: Actor, events: Sequence[Mapping[str, Any]],
                at: datetime) -> int:
    """Append many events in one head lock and one bulk insert; return how many.

    Each event is a mapping with ``action`` and ``outcome`` and optionally ``meter_serial``,
    ``batch_id``, ``key_version_id`` and ``detail``. Every detail is checked before the head is
    locked, so a refused one leaves nothing appended.

    Raises:
        AuditError: a detail looks like key material (the message names the event index).
        ValueError: an event has an unknown field, ``at`` is naive, or action/outcome is empty.
    """
    rows = []
    for index, event in enumerate(events):
        unknown = set(event) - set(_EVENT_FIELDS)
        if unknown:
            raise ValueError(f"audit event {index}: unknown fields {sorted(unknown)}")
        try:
            rows.append(_prepare(actor, at, event))
        except AuditError as exc:
            raise AuditError(None, f"event {index} of batch: {exc.reason}") from None
    return len(_append(session, rows)) if rows else 0


def _prepare(actor: Actor, at: datetime, event: Mapping[str, Any]) -> dict[str, Any]:
    if at.utcoffset() is None:
        raise ValueError("audit time must be timezone-aware")
    action, outcome = event.get("action"), event.get("outcome")
    if not action or not outcome:
        raise ValueError("an audit event needs an action and an outcome")
    batch_id, key_version_id = event.get("batch_id"), event.get("key_version_id")
    return {
        "at": at.astimezone(UTC), "principal": actor.principal, "role": actor.role,
        "action": str(action), "outcome": str(outcome),
        "meter_serial": event.get("meter_serial"),
        # Coerced here so that the hash covers what the integer column will hold.
        "batch_id": None if batch_id is None else int(batch_id),
        "key_version_id": None if key_version_id is None else int(key_version_id),
        "flow_run_id": actor.flow_run_id,
        "detail": canonical_detail(event.get("detail")),
    }


def _append(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seq, prev = lock_head(session)
    for row in rows:
        seq += 1
        row["seq"], row["prev_hash"] = seq, prev
        row["hash"] = prev = event_hash(prev, row)
    conn = session.connection()
    bulk_insert(conn, AuditEvent.__table__, rows)
    conn.execute(update(AuditHead).where(col(AuditHead.id) == HEAD_ID).values(seq=seq, hash=prev))
    return rows


# --- checkpoints ---------------------------------------------------------------------------------
def checkpoint(session: Session, hsm_session: Signer, key_label: str,
               at: datetime) -> AuditCheckpoint | None:
    """Sign the current head with the HSM audit key and store the checkpoint.

    Returns None when the chain is empty or the head is already signed with this key.

    Raises:
        AuditError: the head disagrees with the last event (it is never signed then).
        HsmError: the signature failed.
    """
    seq, head_hash = lock_head(session)
    if seq == 0:
        return None
    last = session.execute(select(col(AuditEvent.hash)).where(col(AuditEvent.seq) == seq)).first()
    if last is None or last.hash != head_hash:
        raise AuditError(seq, "head disagrees with the event it names; not signing it")
    done = session.execute(select(col(AuditCheckpoint.id)).where(
        col(AuditCheckpoint.seq) == seq, col(AuditCheckpoint.key_label) == key_label)).first()
    if done is not None:
        return None
    signature = hsm_session.sign_ecdsa(key_label, checkpoint_digest(seq, head_hash))
    made = AuditCheckpoint(seq=seq, head_hash=head_hash, signature=signature,
                           key_label=key_label, at=at)
    session.add(made)
    session.flush()
    return made


def maybe_checkpoint(session: Session, hsm_session: Signer, key_label: str, every: int,
                     at: datetime) -> AuditCheckpoint | None:
    """Checkpoint when ``every`` or more events were appended since the last checkpoint.

    Raises:
        AuditError: the head disagrees with the last event.
        HsmError: the signature failed.
    """
    seq, _ = lock_head(session)
    last = session.execute(select(func.max(AuditCheckpoint.seq))).scalar() or 0
    if seq - int(last) < every:
        return None
    return checkpoint(session, hsm_session, key_label, at)


# --- reading and verifying -----------------------------------------------------------------------
@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Session]:
    """Yield a session on one consistent snapshot, for verifying while others append.

    PostgreSQL gets a REPEATABLE READ, READ ONLY transaction; SQLite's ``BEGIN IMMEDIATE``
    already keeps writers out while it lasts.
    """
    bind = engine
    if is_postgres(engine):
        bind = engine.execution_options(isolation_level="REPEATABLE READ",
                                        postgresql_readonly=True)
    with Session(bind, expire_on_commit=False) as session, session.begin():
        yield session


def events(session: Session, *, limit: int = 50, meter_serial: str | None = None,
           action: str | None = None) -> list[AuditEvent]:
    """Return the newest events first, optionally of one meter and/or one action."""
    stmt = select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(limit)
    if meter_serial is not None:
        stmt = stmt.where(col(AuditEvent.meter_serial) == meter_serial)
    if action is not None:
        stmt = stmt.where(col(AuditEvent.action) == action)
    return list(session.execute(stmt).scalars())


def verify(session: Session, public_key_pem: str) -> int:
    """Verify the whole chain, the head and every checkpoint; return the number of events.

    Events are streamed in order, so memory stays flat however long the trail is. Run it in
    ``snapshot(engine)`` when others may append meanwhile.

    Raises:
        AuditError: naming the first bad event: an altered event (hash mismatch), a missing one
            (gap or broken link), a truncated trail (head or a checkpoint beyond the last event),
            a head that disagrees with the last event, or a checkpoint whose hash differs from
            the event's or whose signature does not verify.
    """
    public = _load_public(public_key_pem)
    pending: dict[int, list[AuditCheckpoint]] = {}
    for cp in session.execute(select(AuditCheckpoint).order_by(col(AuditCheckpoint.seq))).scalars():
        pending.setdefault(cp.seq, []).append(cp)
    seq, prev = 0, GENESIS
    for row in _stream(session):
        seq = _check_event(row, seq + 1, prev)
        prev = row.hash
        for cp in pending.pop(seq, []):
            _check_checkpoint(public, cp, row.hash)
    _check_tail(session, public, pending, seq, prev)
    return seq


def _stream(session: Session) -> Iterator[Any]:
    cols = [col(AuditEvent.seq), col(AuditEvent.at), col(AuditEvent.principal),
            col(AuditEvent.role), col(AuditEvent.action), col(AuditEvent.outcome),
            col(AuditEvent.meter_serial), col(AuditEvent.batch_id),
            col(AuditEvent.key_version_id), col(AuditEvent.flow_run_id),
            col(AuditEvent.detail), col(AuditEvent.prev_hash), col(AuditEvent.hash)]
    stmt = select(*cols).order_by(col(AuditEvent.seq)).execution_options(yield_per=STREAM_CHUNK)
    yield from session.execute(stmt)


def _check_event(row: Any, expected: int, prev: str) -> int:
    if row.seq != expected:
        raise AuditError(expected, f"event missing (deleted): the next stored event is {row.seq}")
    if row.prev_hash != prev:
        raise AuditError(expected, "prev_hash does not link to the previous event")
    if event_hash(prev, row._mapping) != row.hash:
        raise AuditError(expected, "hash mismatch: the event was altered")
    return expected


def _check_checkpoint(public: ec.EllipticCurvePublicKey, cp: AuditCheckpoint,
                      event_hash_at_seq: str | None) -> None:
    if event_hash_at_seq is not None and cp.head_hash != event_hash_at_seq:
        raise AuditError(cp.seq, f"checkpoint {cp.id} signs a hash that differs from the event's")
    try:
        public.verify(bytes(cp.signature), checkpoint_digest(cp.seq, cp.head_hash),
                      ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError):
        raise AuditError(cp.seq, f"checkpoint {cp.id}: bad signature") from None


def _check_tail(session: Session, public: ec.EllipticCurvePublicKey,
                pending: dict[int, list[AuditCheckpoint]], last_seq: int, last_hash: str) -> None:
    # Checkpoints that matched no event: signed beyond the end (truncation) or at seq < 1.
    for cp_seq in sorted(pending):
        for cp in pending[cp_seq]:
            if cp_seq < 1:
                raise AuditError(cp_seq, f"checkpoint {cp.id} names no event")
            _check_checkpoint(public, cp, None)
            raise AuditError(last_seq + 1, f"event missing: signed checkpoint {cp.id} covers "
                                           f"seq {cp_seq} beyond the last event (truncated)")
    head = session.execute(select(col(AuditHead.seq), col(AuditHead.hash)).where(
        col(AuditHead.id) == HEAD_ID)).first()
    if head is None:
        if last_seq:
            raise AuditError(last_seq, "audit head is missing")
        return
    if head.seq > last_seq:
        raise AuditError(last_seq + 1, f"event missing: the head is at seq {head.seq} "
                                       "(truncated)")
    if head.seq < last_seq:
        raise AuditError(head.seq + 1, f"event beyond the head (head at seq {head.seq})")
    if head.hash != last_hash:
        raise AuditError(last_seq, "head hash differs from the last event's hash")


def _load_public(pem: str) -> ec.EllipticCurvePublicKey:
    try:
        public = serialization.load_pem_public_key(pem.encode("ascii"))
    except ValueError:
        raise AuditError(None, "the audit public key is not a PEM public key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise AuditError(None, "the audit public key is not an EC key")
    return public
