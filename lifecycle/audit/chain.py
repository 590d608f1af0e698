"""The audit hash chain, pure: canonical details, event hashes, checkpoint digests, verification.

Every event carries ``hash_n = SHA-256(prev_hash || canonical JSON of its fields)``, where
``prev_hash`` is the lowercase hex of the previous event's hash (64 ASCII characters; 64 zeros for
the first event) and the canonical JSON is ``json.dumps(fields, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` in UTF-8 over ``seq, at, principal, role, action,
outcome, meter_serial, batch_id, key_version_id, flow_run_id, detail``. ``at`` is ISO 8601 in UTC
with microseconds; ``detail`` is the canonical JSON *text* exactly as stored, so any byte changed
in the stored detail breaks the chain.

Checkpoints are ECDSA P-256 signatures over ``SHA-256(seq as 8 bytes big-endian || raw 32-byte
head hash)``.

Details never hold key material (DESIGN: no plaintext or wrapped key in the database): a detail
is refused when a field name has a word *key*, *keys*, *kek*, *pin*, *blob*, *secret*, *wrapped*,
*password* or *passphrase* (split at ``_``, ``-``, ``.``, spaces and camelCase), unless its last
word marks a reference (``key_id``, ``kek_label``, ``key_version``, ``blob_count``...), and when
a value is bytes or a string containing a run of 32 or more hex digits (an AES-128 key in hex;
this also refuses SHA-256 checksums and undashed UUIDs: name those through ``batch_id`` etc.).

Nothing here reads a database or an HSM: rows, checkpoints and the head are handed in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from lifecycle.errors import AuditError

GENESIS = "0" * 64
OUTCOMES = ("ok", "denied", "failed")
EVENT_FIELDS = ("action", "outcome", "meter_serial", "batch_id", "key_version_id", "detail")

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


# --- building rows -------------------------------------------------------------------------------
def prepare(actor: Actor, at: datetime, event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the row of an event about to be appended (not yet chained).

    Raises:
        AuditError: the detail looks like key material.
        ValueError: ``at`` is naive, or action/outcome is empty.
    """
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



def link(rows: list[dict[str, Any]], seq: int, prev: str) -> tuple[int, str]:
    """Chain rows after the head (seq, prev): set seq, prev_hash and hash; return the new head."""
    for row in rows:
        seq += 1
        row["seq"], row["prev_hash"] = seq, prev
        row["hash"] = prev = event_hash(prev, row)
    return seq, prev


# --- verification --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A signed head as stored: what verification needs of it."""

    id: int
    seq: int
    head_hash: str
    signature: bytes


def verify_chain(rows: Iterable[Any], checkpoints: Iterable[Checkpoint],
                 head: tuple[int, str] | None, public_key_pem: str) -> int:
    """Verify events in seq order, every checkpoint and the head; return the number of events.

    ``rows`` are stored events with attribute access (streamed: memory stays flat).

    Raises:
        AuditError: naming the first bad event: an altered event (hash mismatch), a missing one
            (gap or broken link), a truncated trail (head or a checkpoint beyond the last event),
            a head that disagrees with the last event, or a checkpoint whose hash differs from
            the event's or whose signature does not verify.
    """
    public = _load_public(public_key_pem)
    pending: dict[int, list[Checkpoint]] = {}
    for cp in checkpoints:
        pending.setdefault(cp.seq, []).append(cp)
    seq, prev = 0, GENESIS
    for row in rows:
        seq = _check_event(row, seq + 1, prev)
        prev = row.hash
        for cp in pending.pop(seq, []):
            _check_checkpoint(public, cp, row.hash)
    _check_tail(public, pending, head, seq, prev)
    return seq


def _check_event(row: Any, expected: int, prev: str) -> int:
    if row.seq != expected:
        raise AuditError(expected, f"event missing (deleted): the next stored event is {row.seq}")
    if row.prev_hash != prev:
        raise AuditError(expected, "prev_hash does not link to the previous event")
    if event_hash(prev, row._mapping) != row.hash:
        raise AuditError(expected, "hash mismatch: the event was altered")
    return expected


def _check_checkpoint(public: ec.EllipticCurvePublicKey, cp: Checkpoint,
                      event_hash_at_seq: str | None) -> None:
    if event_hash_at_seq is not None and cp.head_hash != event_hash_at_seq:
        raise AuditError(cp.seq, f"checkpoint {cp.id} signs a hash that differs from the event's")
    try:
        public.verify(bytes(cp.signature), checkpoint_digest(cp.seq, cp.head_hash),
                      ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError):
        raise AuditError(cp.seq, f"checkpoint {cp.id}: bad signature") from None


def _check_tail(public: ec.EllipticCurvePublicKey, pending: dict[int, list[Checkpoint]],
                head: tuple[int, str] | None, last_seq: int, last_hash: str) -> None:
    # Checkpoints that matched no event: signed beyond the end (truncation) or at seq < 1.
    for cp_seq in sorted(pending):
        for cp in pending[cp_seq]:
            if cp_seq < 1:
                raise AuditError(cp_seq, f"checkpoint {cp.id} names no event")
            _check_checkpoint(public, cp, None)
            raise AuditError(last_seq + 1, f"event missing: signed checkpoint {cp.id} covers "
                                           f"seq {cp_seq} beyond the last event (truncated)")
    if head is None:
        if last_seq:
            raise AuditError(last_seq, "audit head is missing")
        return
    head_seq, head_hash = head
    if head_seq > last_seq:
        raise AuditError(last_seq + 1, f"event missing: the head is at seq {head_seq} "
                                       "(truncated)")
    if head_seq < last_seq:
        raise AuditError(head_seq + 1, f"event beyond the head (head at seq {head_seq})")
    if head_hash != last_hash:
        raise AuditError(last_seq, "head hash differs from the last event's hash")


def _load_public(pem: str) -> ec.EllipticCurvePublicKey:
    try:
        public = serialization.load_pem_public_key(pem.encode("ascii"))
    except ValueError:
        raise AuditError(None, "the audit public key is not a PEM public key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise AuditError(None, "the audit public key is not an EC key")
    return public
