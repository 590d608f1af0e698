"""The audit trail over the inventory: record events, sign checkpoints, verify.

Events commit atomically with the data change they describe: they are appended in the caller's
transaction, under the chain head's lock (``lifecycle.inventory.audit_events``), so appenders in
many processes produce one linear chain.

The chain alone proves nothing against someone who can rewrite the database: they can rehash
every event after the one they altered. Checkpoints close that gap: the head signed in the HSM
with the audit key. Events up to the last checkpoint are anchored; events after it are protected
by the chain only until the next checkpoint: one is signed at every completed batch, after every
``audit_checkpoint_every`` events (``maybe_checkpoint``), and by ``meterkeys audit checkpoint``.
``verify`` takes one public key: checkpoints made with an earlier audit key fail it (rotation of
the audit key is not built).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from lifecycle.audit.chain import (
    EVENT_FIELDS,
    GENESIS,
    Actor,
    Checkpoint,
    checkpoint_digest,
    link,
    prepare,
    verify_chain,
)
from lifecycle.errors import AuditError
from lifecycle.inventory import audit_events
from lifecycle.inventory.audit_events import AuditCheckpoint, AuditEvent
from lifecycle.inventory.db import Session


class Signer(Protocol):
    """The part of ``lifecycle.hsm.session.HsmSession`` a checkpoint needs."""

    def sign_ecdsa(self, label: str, digest: bytes) -> bytes: ...


def lock_head(session: Session) -> tuple[int, str]:
    """Lock the chain head for this transaction; return (seq, hash).

    Raises:
        AuditError: the head row is missing while events exist.
    """
    return audit_events.lock_head(session, GENESIS)


def record(session: Session, actor: Actor, action: str, outcome: str, *,
           meter_serial: str | None = None, batch_id: int | None = None,
           key_version_id: int | None = None, detail: dict[str, Any] | None = None,
           at: datetime) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction; return it (not attached).

    Raises:
        AuditError: the detail looks like key material, or the head is missing.
        ValueError: ``at`` is naive, or action/outcome is empty.
    """
    row = prepare(actor, at, {"action": action, "outcome": outcome,
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
        unknown = set(event) - set(EVENT_FIELDS)
        if unknown:
            raise ValueError(f"audit event {index}: unknown fields {sorted(unknown)}")
        try:
            rows.append(prepare(actor, at, event))
        except AuditError as exc:
            raise AuditError(None, f"event {index} of batch: {exc.reason}") from None
    return len(_append(session, rows)) if rows else 0


def _append(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seq, prev = lock_head(session)
    seq, prev = link(rows, seq, prev)
    audit_events.append_rows(session, rows, seq, prev)
    return rows


def checkpoint(session: Session, signer: Signer, key_label: str,
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
    if audit_events.hash_at(session, seq) != head_hash:
        raise AuditError(seq, "head disagrees with the event it names; not signing it")
    if audit_events.has_checkpoint(session, seq, key_label):
        return None
    signature = signer.sign_ecdsa(key_label, checkpoint_digest(seq, head_hash))
    return audit_events.add_checkpoint(session, seq=seq, head_hash=head_hash,
                                       signature=signature, key_label=key_label, at=at)


def maybe_checkpoint(session: Session, signer: Signer, key_label: str, every: int,
                     at: datetime) -> AuditCheckpoint | None:
    """Checkpoint when ``every`` or more events were appended since the last checkpoint.

    Raises:
        AuditError: the head disagrees with the last event.
        HsmError: the signature failed.
    """
    seq, _ = lock_head(session)
    if seq - audit_events.last_checkpoint_seq(session) < every:
        return None
    return checkpoint(session, signer, key_label, at)


def verify(session: Session, public_key_pem: str) -> int:
    """Verify the whole chain, the head and every checkpoint; return the number of events.

    Events are streamed in order, so memory stays flat however long the trail is. Run it in
    ``lifecycle.inventory.db.snapshot(engine)`` when others may append meanwhile.

    Raises:
        AuditError: naming the first bad event (see ``lifecycle.audit.chain.verify_chain``).
    """
    signed = [Checkpoint(int(cp.id or 0), cp.seq, cp.head_hash, bytes(cp.signature))
              for cp in audit_events.checkpoints(session)]
    return verify_chain(audit_events.stream_events(session), signed,
                        audit_events.read_head(session), public_key_pem)


def events(session: Session, *, limit: int = 50, meter_serial: str | None = None,
           action: str | None = None) -> list[AuditEvent]:
    """Return the newest events first, optionally of one meter and/or one action."""
    return audit_events.recent_events(session, limit=limit, meter_serial=meter_serial,
                                      action=action)
