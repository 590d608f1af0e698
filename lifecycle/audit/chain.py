"""The audit hash chain, pure: canonical details, event hashes, checkpoint digests, verification.

Every event carries ``hash_n = SHA-256(prev_hash || canonical JSON of its fields)``, where
``prev_hash`` is the lowercase hex of the previous event's hash (64 ASCII characters; 64 zeros for
the first event) and the canonical JSON is ``json.dumps(fields, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` in UTF-8 over ``seq, at, principal, role, action,
outcome, meter_serial, batch_id, key_version_id, flow_run_id, detail``. ``at`` is ISO 8601 in UTC
with microseconds; ``detail`` is the canonical JSON *text* exactly as stored, so any byte changed
in the stored detail breaks the chain.

A checkpoint is an ECDSA P-256 signature, made in the HSM with the audit key, over a
domain-separated digest: SHA-256 of the canonical JSON (as above, ASCII) of ``purpose``
(``meterkeys-audit-checkpoint/1``), ``installation`` (the inventory's UUID), ``seq``, ``head``
(hex) and ``time`` (ISO 8601 UTC, microseconds). The purpose keeps the audit key's signature on
a checkpoint from ever meaning anything else (a backup manifest signs its own prefix), and the
installation keeps one installation's checkpoints from verifying in another.

Signed heads also go to a witness outside the inventory (``lifecycle.audit.witness``).
``verify_chain`` checks the events against it: every witnessed head must be the chain's hash at
its seq and a checkpoint the inventory still holds, and no witnessed seq may lie beyond the last
event. That is what a database writer cannot rewrite: an event re-chained (and re-signed, with the
PIN) no longer matches the head witnessed earlier, a truncated or emptied trail lacks a witnessed
seq. Events after the last witnessed head are protected by the chain alone until the next
checkpoint.

Details never hold key material (DESIGN: no plaintext or wrapped key in the database): a detail
is refused when a field name has a word *key*, *keys*, *kek*, *pin*, *blob*, *secret*, *wrapped*,
*password* or *passphrase* (split at ``_``, ``-``, ``.``, spaces and camelCase), unless its last
word marks a reference (``key_id``, ``kek_label``, ``key_version``, ``blob_count``...), and when
a value is bytes or a string containing a run of 32 or more hex digits (an AES-128 key in hex;
this also refuses SHA-256 checksums and undashed UUIDs: name those through ``batch_id`` etc.).

Nothing here reads a database, a file or an HSM: rows, checkpoints, the head and what the witness
holds are handed in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from lifecycle.errors import AuditError

GENESIS = "0" * 64
CHECKPOINT_PURPOSE = "meterkeys-audit-checkpoint/1"
OUTCOMES = ("ok", "denied", "failed")
EVENT_FIELDS = ("action", "outcome", "meter_serial", "batch_id", "key_version_id", "detail")

_SECRET_WORDS = frozenset({"key", "keys", "kek", "keks", "pin", "pins", "blob", "blobs", "secret",
                           "secrets", "wrapped", "password", "passphrase"})
_REFERENCE_WORDS = frozenset({"id", "ids", "label", "labels", "version", "versions", "count",
                              "state", "states"})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")
_HEAD = re.compile(r"[0-9a-f]{64}")


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


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _names_ok(value: Any) -> bool:
    # Exact types only (a detail is made of dicts, lists and plain values): anything else, a
    # subclass included, answers False and takes the slow walk, which decides.
    kind = type(value)
    if kind is dict:
        if not _names_allowed(tuple(value)):
            return False
        items = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return False
    for item in items:  # noqa: SIM110 - a loop, not all() over a generator: runs per event
        if type(item) not in _SCALARS and not _names_ok(item):
            return False
    return True


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
@functools.lru_cache(maxsize=64)  # a batch of events shares one time
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


def checkpoint_digest(installation: str, seq: int, head_hash: str, at: datetime) -> bytes:
    """Return the digest a checkpoint signs: SHA-256 of the canonical JSON of purpose,
    installation, seq, head and time (see the module docstring).

    Raises:
        ValueError: seq below 1, or a head that is not 64 hex digits.
    """
    if seq < 1 or not _HEAD.fullmatch(head_hash):
        raise ValueError("a checkpoint names an event (seq >= 1) and its 64-hex-digit hash")
    body = json.dumps({"purpose": CHECKPOINT_PURPOSE, "installation": installation, "seq": seq,
                       "head": head_hash, "time": _iso(at)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode("ascii")).digest()


def key_fingerprint(public_key_pem: str | bytes) -> str:
    """Return the audit key's fingerprint: SHA-256 (hex) of its SubjectPublicKeyInfo (DER), the
    check value ``meterkeys hsm init`` pins for a key pair (``lifecycle.hsm.keyring``).

    Raises:
        AuditError: not a PEM EC public key.
    """
    pem = public_key_pem.decode("ascii") if isinstance(public_key_pem, bytes) else public_key_pem
    der = _load_public(pem).public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


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
    """A signed head as the inventory stores it: what verification needs of it."""

    id: int
    seq: int
    head_hash: str
    at: datetime
    signature: bytes


@dataclass(frozen=True)
class SignedHead:
    """A signed head as the witness keeps it: what was signed, the signature (DER) and the
    signing key's fingerprint."""

    installation: str
    seq: int
    head_hash: str
    at: datetime
    signature: bytes
    key: str

    def digest(self) -> bytes:
        """Return the digest the signature covers (``checkpoint_digest``).

        Raises:
            ValueError: seq below 1, or a head that is not 64 hex digits.
        """
        return checkpoint_digest(self.installation, self.seq, self.head_hash, self.at)


@dataclass(frozen=True)
class WitnessLog:
    """What a witness holds: where it is, the installation its header names (None: nothing
    witnessed yet) and its signed heads in the order they were appended."""

    where: str
    installation: str | None
    records: tuple[SignedHead, ...] = ()


@dataclass(frozen=True)
class Anchors:
    """What the trail is verified against, none of it taken from the audit tables: the audit
    public key, the fingerprint pinned at initialisation, the inventory's installation id and
    what the witness holds."""

    public_key_pem: str
    pinned_key: str
    installation: str | None
    witness: WitnessLog


def verify_chain(rows: Iterable[Any], checkpoints: Iterable[Checkpoint],
                 head: tuple[int, str] | None, anchors: Anchors) -> int:
    """Verify events in seq order, every checkpoint, the head and the witness; return the
    number of events.

    ``rows`` are stored events with attribute access (streamed: memory stays flat).

    Raises:
        AuditError: naming the first bad event or the missing head: a public key that is not
            the pinned one; an altered event (hash mismatch); a missing one (gap or broken
            link); a trail rewritten and re-chained (the hash at a witnessed seq differs from
            the witnessed head, re-signed or not); a truncated or emptied trail (the head, a
            checkpoint or a witnessed head beyond the last event); a head that disagrees with
            the last event; a checkpoint whose hash differs from the event's, whose signature
            does not verify, or which the witness holds and the inventory lost; a witness of
            another installation or key.
    """
    public = _load_public(anchors.public_key_pem)
    _check_pin(anchors)
    witnessed = _witnessed(public, anchors)
    stored: dict[int, list[Checkpoint]] = {}
    for cp in checkpoints:
        stored.setdefault(cp.seq, []).append(cp)
    pending = {seq: list(cps) for seq, cps in stored.items()}
    seq, prev, anchored = 0, GENESIS, 0
    lost: list[SignedHead] = []
    for row in rows:
        seq = _check_event(row, seq + 1, prev)
        prev = row.hash
        for cp in pending.pop(seq, []):
            _check_checkpoint(public, anchors.installation, cp, row.hash)
        for signed in witnessed.get(seq, []):
            _check_witnessed(signed, row.hash, anchored)
            if not any(cp.head_hash == signed.head_hash for cp in stored.get(seq, [])):
                lost.append(signed)
            anchored = seq
    _check_tail(public, anchors.installation, pending, head, seq, prev)
    _check_witness_tail(witnessed, seq)
    _check_installation(anchors, bool(stored))
    # A deleted checkpoint of an intact event is named last: a rewritten or missing event
    # found anywhere in the trail, or a witness of another installation, is the graver finding.
    if lost:
        raise AuditError(lost[0].seq, f"the checkpoint the witness holds for this event (signed "
                                      f"{_iso(lost[0].at)}) is missing from the inventory "
                                      "(deleted)")
    return seq


def _check_pin(anchors: Anchors) -> None:
    # Only the key pinned when the installation was initialised counts: a database writer can
    # sign checkpoints with a key of their own, and a verifier handed that key would agree.
    found = key_fingerprint(anchors.public_key_pem)
    if found != anchors.pinned_key:
        raise AuditError(None, f"the audit public key (fingerprint {found[:16]}…) is not the "
                               f"key pinned at initialisation ({anchors.pinned_key[:16]}…)")


def _witnessed(public: ec.EllipticCurvePublicKey, anchors: Anchors) -> dict[int, list[SignedHead]]:
    log, out = anchors.witness, dict[int, list[SignedHead]]()
    for signed in log.records:
        what = f"witness {log.where}: the head of seq {signed.seq}"
        if signed.installation != log.installation:
            raise AuditError(signed.seq, f"{what} names another installation than its header")
        if signed.key != anchors.pinned_key:
            raise AuditError(signed.seq, f"{what} is signed by another key than the pinned one")
        _check_signature(public, signed.signature, signed.digest, signed.seq, what)
        out.setdefault(signed.seq, []).append(signed)
    return out


def _check_event(row: Any, expected: int, prev: str) -> int:
    if row.seq != expected:
        raise AuditError(expected, f"event missing (deleted): the next stored event is {row.seq}")
    if row.prev_hash != prev:
        raise AuditError(expected, "prev_hash does not link to the previous event")
    if event_hash(prev, row._mapping) != row.hash:
        raise AuditError(expected, "hash mismatch: the event was altered")
    return expected


def _check_checkpoint(public: ec.EllipticCurvePublicKey, installation: str | None,
                      cp: Checkpoint, event_hash_at_seq: str | None) -> None:
    if event_hash_at_seq is not None and cp.head_hash != event_hash_at_seq:
        raise AuditError(cp.seq, f"checkpoint {cp.id} signs a hash that differs from the event's")
    if installation is None:
        raise AuditError(cp.seq, f"checkpoint {cp.id} cannot be checked: the inventory has no "
                                 "installation id")
    _check_signature(public, cp.signature,
                     lambda: checkpoint_digest(installation, cp.seq, cp.head_hash, cp.at),
                     cp.seq, f"checkpoint {cp.id}")


def _check_signature(public: ec.EllipticCurvePublicKey, signature: bytes,
                     digest: Callable[[], bytes], seq: int, what: str) -> None:
    try:
        public.verify(bytes(signature), digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError):
        raise AuditError(seq, f"{what}: bad signature") from None


def _check_witnessed(signed: SignedHead, event_hash_at_seq: str, anchored: int) -> None:
    # The witness holds heads only: an event was rewritten somewhere after the last witnessed
    # head that still matches, so the first event that may be bad is the one after it.
    when = _iso(signed.at)
    if signed.head_hash != event_hash_at_seq:
        first = anchored + 1
        span = "" if first == signed.seq else f" (this event or a later one, up to {signed.seq})"
        raise AuditError(first, f"rewritten{span}: the chain's hash at seq {signed.seq} "
                                f"differs from the head the witness holds, signed {when}; the "
                                "trail was re-chained after that checkpoint")


def _check_tail(public: ec.EllipticCurvePublicKey, installation: str | None,
                pending: dict[int, list[Checkpoint]], head: tuple[int, str] | None,
                last_seq: int, last_hash: str) -> None:
    # Checkpoints that matched no event: signed beyond the end (truncation) or at seq < 1.
    for cp_seq in sorted(pending):
        for cp in pending[cp_seq]:
            if cp_seq < 1:
                raise AuditError(cp_seq, f"checkpoint {cp.id} names no event")
            _check_checkpoint(public, installation, cp, None)
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


def _check_witness_tail(witnessed: dict[int, list[SignedHead]], last_seq: int) -> None:
    beyond = [seq for seq in witnessed if seq > last_seq]
    if beyond:
        top = witnessed[max(beyond)][-1]
        what = "emptied" if last_seq == 0 else "truncated"
        raise AuditError(last_seq + 1, f"event missing: the witness holds the head of seq "
                                       f"{top.seq}, signed {_iso(top.at)}, but the trail ends "
                                       f"at seq {last_seq} ({what})")


def _check_installation(anchors: Anchors, has_checkpoints: bool) -> None:
    log = anchors.witness
    if not log.records:
        if has_checkpoints:
            raise AuditError(None, f"the inventory holds signed checkpoints but the witness "
                                   f"{log.where} holds none: a wrong witness folder, or a lost "
                                   "witness")
        return
    if anchors.installation is None:
        raise AuditError(None, f"the inventory has no installation id; the witness "
                               f"{log.where} belongs to installation {log.installation}")
    if anchors.installation != log.installation:
        raise AuditError(None, f"the inventory is installation {anchors.installation}; the "
                               f"witness {log.where} belongs to installation {log.installation}")

def _load_public(pem: str) -> ec.EllipticCurvePublicKey:
    try:
        public = serialization.load_pem_public_key(pem.encode("ascii"))
    except ValueError:
        raise AuditError(None, "the audit public key is not a PEM public key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise AuditError(None, "the audit public key is not an EC key")
    return public
