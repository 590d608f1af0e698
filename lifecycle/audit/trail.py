"""The audit trail over the inventory: record events, sign checkpoints, verify.

Events commit atomically with the data change they describe: they are appended in the caller's
transaction, under the chain head's lock (``lifecycle.inventory.audit_events``), so appenders in
many processes produce one linear chain.

The chain alone proves nothing against someone who can rewrite the database: they can rehash
every event after the one they altered. Checkpoints close that gap: the head signed in the HSM
with the audit key (a domain-separated digest naming the installation,
``lifecycle.audit.chain.checkpoint_digest``) and, once the checkpoint has committed, appended to
a witness outside the inventory (``lifecycle.audit.witness``). Signatures alone do not stop a
writer who also holds the PIN, nor one who deletes checkpoints or truncates the trail; the
witness does: ``verify`` checks every witnessed head against the chain. Events up to the last
witnessed checkpoint are anchored; events after it are protected by the chain only until the
next checkpoint: one closes every factory-import run (``finish_batch``, also when a completed
delivery is re-run), one is signed after every ``audit_checkpoint_every`` events
(``maybe_checkpoint``), and by ``meterkeys audit checkpoint``.

``verify`` takes one public key, which must be the one pinned at initialisation: checkpoints
made with an earlier audit key fail it (rotation of the audit key is not built).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from lifecycle.audit import witness
from lifecycle.audit.chain import (
    EVENT_FIELDS,
    GENESIS,
    Actor,
    Anchors,
    Checkpoint,
    SignedHead,
    WitnessLog,
    checkpoint_digest,
    key_fingerprint,
    link,
    prepare,
    verify_chain,
)
from lifecycle.config import Settings
from lifecycle.errors import AuditError
from lifecycle.inventory import audit_events, installations
from lifecycle.inventory.audit_events import AuditCheckpoint, AuditEvent
from lifecycle.inventory.db import Session


class Signer(Protocol):
    """The part of ``lifecycle.hsm.session.HsmSession`` a checkpoint needs."""

    def sign_ecdsa(self, label: str, digest: bytes) -> bytes: ...

    def public_key_pem(self, label: str) -> bytes: ...


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


def checkpoint(session: Session, signer: Signer, settings: Settings,
               at: datetime) -> AuditCheckpoint | None:
    """Sign the current head with the HSM audit key, store the checkpoint, and hand the signed
    head to the settings' witness once the caller's transaction has committed.

    Returns None when the chain is empty or the head is already signed with this key. The
    witness is checked (it must be this installation's) before anything is signed; it receives
    the head only after the commit, so it never holds a head the inventory rolled back (a
    crash in between leaves one checkpoint unwitnessed: the witness is a subset).

    Raises:
        AuditError: the head disagrees with the last event (it is never signed then), the
            inventory has no installation id, or the witness belongs to another installation
            or cannot be written (after the commit, when appending fails).
        HsmError: the signature failed.
        ValueError: ``at`` is naive.
    """
    if at.utcoffset() is None:
        raise ValueError("checkpoint time must be timezone-aware")
    seq, head_hash = lock_head(session)
    if seq == 0:
        return None
    if audit_events.hash_at(session, seq) != head_hash:
        raise AuditError(seq, "head disagrees with the event it names; not signing it")
    label = settings.audit_key_label
    if audit_events.has_checkpoint(session, seq, label):
        return None
    installation = installations.installation_id(session)
    if installation is None:
        raise AuditError(seq, "the inventory has no installation id (deleted?); not signing")
    sink = witness.from_settings(settings)
    sink.bind(installation)
    key = key_fingerprint(signer.public_key_pem(label))
    signature = signer.sign_ecdsa(label, checkpoint_digest(installation, seq, head_hash, at))
    made = audit_events.add_checkpoint(session, seq=seq, head_hash=head_hash,
                                       signature=signature, key_label=label, at=at)
    signed = SignedHead(installation, seq, head_hash, at, signature, key)
    audit_events.on_commit(session, lambda: sink.append(signed))
    return made


def maybe_checkpoint(session: Session, signer: Signer, settings: Settings,
                     at: datetime) -> AuditCheckpoint | None:
    """Checkpoint when ``settings.audit_checkpoint_every`` or more events were appended since
    the last checkpoint (see ``checkpoint``).

    Raises:
        AuditError: see ``checkpoint``.
        HsmError: the signature failed.
    """
    seq, _ = lock_head(session)
    if seq - audit_events.last_checkpoint_seq(session) < settings.audit_checkpoint_every:
        return None
    return checkpoint(session, signer, settings, at)


def verify(session: Session, public_key_pem: str, pinned_key: str, held: WitnessLog) -> int:
    """Verify the whole chain, the head and every checkpoint against the pinned audit key and
    what the witness holds; return the number of events.

    ``pinned_key`` is the audit key's fingerprint pinned at initialisation
    (``lifecycle.audit.chain.key_fingerprint``). Read the witness *before* opening the
    session's snapshot: a head is witnessed only after its checkpoint committed, so every
    witnessed head is then in the snapshot. Events are streamed in order, so memory stays flat
    however long the trail is. Run it in ``lifecycle.inventory.db.snapshot(engine)`` when
    others may append meanwhile.

    Raises:
        AuditError: naming the first bad event or missing head (see
            ``lifecycle.audit.chain.verify_chain``).
    """
    signed = [Checkpoint(int(cp.id or 0), cp.seq, cp.head_hash, cp.at, bytes(cp.signature))
              for cp in audit_events.checkpoints(session)]
    anchors = Anchors(public_key_pem, pinned_key, installations.installation_id(session), held)
    return verify_chain(audit_events.stream_events(session), signed,
                        audit_events.read_head(session), anchors)


def events(session: Session, *, limit: int = 50, meter_serial: str | None = None,
           action: str | None = None) -> list[AuditEvent]:
    """Return the newest events first, optionally of one meter and/or one action."""
    return audit_events.recent_events(session, limit=limit, meter_serial=meter_serial,
                                      action=action)
