"""Administrative steps of an installation: token and keys, status, backup, restore, audit key.

These are what ``meterkeys hsm ...`` and ``meterkeys audit ...`` run: each combines the HSM, the
inventory and the audit trail, so that the command line never drives an HSM session or the
database itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lifecycle.audit import trail, witness
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.errors import (
    AuditError,
    BackupError,
    HsmError,
    KeyNotFound,
    KeyPolicyError,
    MeterkeysError,
)
from lifecycle.hsm import check, keyring, provision, softhsm_backup
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.session import HsmSession
from lifecycle.hsm.softhsm_backup import BackupResult, RestoreReport
from lifecycle.installation import rules
from lifecycle.inventory import backups, hsm_keys, kek_checks, meters
from lifecycle.inventory.audit_events import AuditCheckpoint
from lifecycle.inventory.db import Engine, Session, snapshot, transaction

CANARY_BITS = 128
SAMPLE_BLOBS = 8
AUDIT_ROLE = "audit-signing"
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")  # as the audit trail refuses (lifecycle.audit.chain)


@dataclass(frozen=True)
class InitReport:
    """What ``init`` found or made: item -> "created" or "present"; the keys made (role, label)."""

    items: dict[str, str]
    created_keys: tuple[tuple[str, str], ...] = ()


# The principal of set-ups that run without one (tests, the benchmark); the command line always
# passes the acting principal.
UNATTENDED = Actor("unattended-setup", None)
SO_PIN_DISCARDED = "created, used and removed (not kept; METERKEYS_KEEP_SO_PIN=true keeps it)"


def init(settings: Settings, engine: Engine, *, make_pin_files: bool,
         actor: Actor = UNATTENDED, now: datetime | None = None) -> InitReport:
    """Create what is missing: PIN files (embedded token), the token, its long-lived keys, their
    pins and the storage KEK's canary in the inventory; audit it. Idempotent.

    Audited as ``hsm.init`` (what was created, what was present) with one ``hsm.key.create``
    per long-lived key made, by ``actor``; a failed init is audited as failed. The generated SO
    PIN file is removed once the token is initialised unless ``keep_so_pin``.

    Raises:
        ConfigError: PINs missing or placeholders.
        KeyPolicyError: a pinned key or a KEK with blobs is missing, or a present key is not
            the pinned one or is weaker than policy.
        HsmError: the token or a key could not be made.
    """
    at = now or utcnow()
    try:
        report = _init(settings, engine, make_pin_files=make_pin_files)
    except MeterkeysError as exc:
        record_failure(engine, actor, "hsm.init", exc, {}, at)
        raise
    audit_init(engine, actor, report, at)
    return report


def _init(settings: Settings, engine: Engine, *, make_pin_files: bool) -> InitReport:
    """Create what is missing (see ``init``).

    A key the inventory pins, or a storage KEK the inventory holds blobs under, is never made
    anew: if the token lacks it, the KEK is lost and only a backup brings it back (a new KEK
    would orphan every blob). A present key must be the pinned one.

    Raises:
        ConfigError: PINs missing or placeholders.
        KeyPolicyError: a pinned key or a KEK with blobs is missing, or a present key is not
            the pinned one or is weaker than policy.
        HsmError: the token or a key could not be made.
    """
    items: dict[str, str] = {}
    if make_pin_files:
        made = {p.name for p in provision.generate_pin_files(settings)}
        for name in ("so.pin", "user.pin"):
            exists = (settings.secrets_dir / name).exists()
            items[f"PIN file {name}"] = ("created" if name in made else
                                         "present" if exists else "absent (not kept)")
    created = provision.init_token(settings)
    items[f"token {settings.token_label!r}"] = "created" if created else "present"
    if items.get("PIN file so.pin") == "created" and not (settings.secrets_dir / "so.pin").exists():
        items["PIN file so.pin"] = SO_PIN_DISCARDED
    with transaction(engine) as db:
        pins = _pins(db)
        refuse = _refusals(settings, db, pins)
    states = provision.ensure_keys(settings, refuse)
    for state in states:
        _same_as_pinned(pins.get(state.role), state.pin)
    with transaction(engine) as db:
        for state in states:
            hsm_keys.put_pin(db, state.role, state.pin.label, state.pin.key_id,
                             state.pin.check_value)
            items[f"key {state.pin.label!r}"] = state.state
    keyring.trust(state.pin for state in states)
    canary = ensure_kek_check(settings, engine)
    items[f"KEK canary for {settings.storage_kek_label!r}"] = "created" if canary else "present"
    return InitReport(items, tuple((s.role, s.pin.label) for s in states if s.state == "created"))


def _refusals(settings: Settings, db: Session, pins: dict[str, KeyPin]) -> dict[str, str]:
    """Roles whose key must not be made anew, with why (a pin, or blobs under a KEK)."""
    refuse = {role: f"the inventory pins it (CKA_ID {pin.key_id})" for role, pin in pins.items()}
    for role in ("storage-kek", "storage-kek-master"):
        label = keyring.role_labels(settings)[role]
        if role not in refuse and meters.sample_blobs(db, label, 1):
            refuse[role] = "the inventory holds key blobs under it"
    return refuse


def _same_as_pinned(pinned: KeyPin | None, found: KeyPin) -> None:
    if pinned is None:
        return
    kind = keyring.kind_of_role(found.role)
    if pinned.label != found.label:
        raise KeyPolicyError(kind.name, found.label, f"the inventory pins label "
                                                     f"{pinned.label!r} for this role")
    if pinned.key_id != found.key_id:
        raise KeyPolicyError(kind.name, found.label, f"CKA_ID is {found.key_id}; pinned: "
                                                     f"{pinned.key_id}")
    if pinned.check_value != found.check_value:
        raise KeyPolicyError(kind.name, found.label, "check value differs from the pin: "
                                                     "another key under the pinned label and id")


def check_keys(settings: Settings, engine: Engine) -> list[KeyPin]:
    """Verify every pinned long-lived key and the module's mechanisms before any work; return
    the pins, which this process's HSM lookups then enforce too.

    Call it at the start of every flow run and in every HSM worker process.

    Raises:
        KeyNotFound: a pinned key is missing from the token.
        KeyPolicyError: a role is not pinned, or its key is duplicated, substituted (CKA_ID or
            check value) or weaker than policy, naming the key and the attribute.
        PermanentHsmError: the module lacks a mechanism meterkeys needs.
    """
    with transaction(engine) as db:
        pins = list(_pins(db).values())
    check.require_pins(settings, pins)
    check.verify_pins(settings, pins)
    return pins


def hsm_check(settings: Settings, engine: Engine) -> check.CheckReport:
    """Probe the module's protections and mechanisms and describe every long-lived key.

    Raises:
        HsmError: the token could not be opened.
    """
    with transaction(engine) as db:
        pins = list(_pins(db).values())
    return check.report(settings, pins)


def ensure_kek_check(settings: Settings, engine: Engine) -> bool:
    """Store a canary blob for the storage KEK unless the inventory has one; return if created.

    The canary is a random AES key generated in the HSM, wrapped under the storage KEK
    (RFC 3394) and destroyed; only the wrapped blob is stored.

    Raises:
        HsmError: the HSM could not generate or wrap the canary.
    """
    label = settings.storage_kek_label
    with transaction(engine) as db:
        if kek_checks.get_kek_check(db, label) is not None:
            return False
    with Hsm.open(settings).session() as s, s.scoped(s.generate_session_aes(CANARY_BITS)) as key:
        blob = s.wrap_aes(label, key)
    with transaction(engine) as db:
        kek_checks.put_kek_check(db, label, blob)
    return True


def status(settings: Settings, engine: Engine) -> dict[str, str]:
    """Report the module, the token, its long-lived keys against their pins, and the canary.

    A key is "pinned, verified" only if it is the one object with its label, carries the pinned
    CKA_ID and check value and meets its policy; a look-alike is reported as such.

    Raises:
        ConfigError: no module configured.
        HsmError: the token could not be opened.
    """
    report = {"PKCS#11 module": str(settings.module_path)}
    if settings.is_softhsm:
        report["token directory"] = str(settings.token_dir)
    present = provision.token_exists(settings)
    report[f"token {settings.token_label!r}"] = "present" if present else "absent"
    with transaction(engine) as session:
        pins = _pins(session)
        canary = kek_checks.get_kek_check(session, settings.storage_kek_label)
    if present:
        with Hsm.open(settings).session() as s:
            for role, label in keyring.role_labels(settings).items():
                report[f"key {label!r}"] = _key_status(s, role, label, pins.get(role))
    report[f"KEK canary for {settings.storage_kek_label!r}"] = \
        "present" if canary is not None else "absent"
    return report


def _key_status(s: HsmSession, role: str, label: str, pin: KeyPin | None) -> str:
    try:
        s.check_key(label, keyring.kind_of_role(role), pin)
    except KeyNotFound:
        return "absent"
    except HsmError as exc:
        return f"REFUSED: {exc}"
    return "pinned, verified" if pin is not None else "present, NOT pinned (run hsm init)"


def backup(settings: Settings, engine: Engine, actor: Actor, dest: Path, *,
           timeout: float = 10.0, now: datetime | None = None) -> BackupResult:
    """Back up the embedded token as the next generation, signed, recorded and audited.

    The generation is the last recorded one plus one; the manifest lists the inventory's pins
    of the long-lived keys and is signed with the pinned audit key
    (``lifecycle.hsm.softhsm_backup.backup``). A failed backup is audited as failed.

    Raises:
        BackupError: no canary or no audit key pin in the inventory, or signing failed.
        ConfigError, TokenBusy: see ``softhsm_backup.backup``.
        InventoryError: another backup took the generation meanwhile.
    """
    at = now or utcnow()
    try:
        with transaction(engine) as db:
            canary = kek_checks.get_kek_check(db, settings.storage_kek_label)
            pins = _pins(db)
            generation = backups.next_generation(db)
        if canary is None:
            raise BackupError(settings.token_dir, f"the inventory has no kek_check canary for "
                                                  f"{settings.storage_kek_label!r}: run "
                                                  "meterkeys hsm init")
        result = softhsm_backup.backup(
            settings, canary=bytes(canary.blob), generation=generation,
            pins=tuple(pins.values()), audit_check_value=_audit_pin(settings, pins).check_value,
            dest=dest, timeout=timeout, now=at)
        with transaction(engine) as db:
            backups.record_backup(db, generation, str(result.path), result.manifest_sha256, at)
            trail.record(db, actor, "hsm.backup", "ok", at=at, detail={
                "generation": generation, "backup": result.path.name,
                "roles": sorted(pins)})
    except MeterkeysError as exc:
        record_failure(engine, actor, "hsm.backup", exc, {}, at)
        raise
    return result


def restore(settings: Settings, engine: Engine, actor: Actor, src: Path, *, force: bool = False,
            timeout: float = 10.0, now: datetime | None = None) -> RestoreReport:
    """Restore a signed backup of the latest generation after proving it holds the pinned keys.

    Checks, in order: the manifest's signature under the pinned audit key and its object set
    (``softhsm_backup.verify_backup``); the generation and key set against the inventory
    (``rules.decide_restore``: an older or unrecorded generation only with ``force``); then, in
    a child on the staged copy, each pinned key's CKA_ID, attributes and check value and the
    known-answer unwrap of the KEK canaries and sample blobs. Audited, as forced when ``force``
    overrode a refusal; a refused restore is audited as failed.

    Raises:
        BackupError: no canary or audit key pin in the inventory, or any refusal above.
        ConfigError, TokenBusy: see ``softhsm_backup.restore``.
    """
    at = now or utcnow()
    try:
        with transaction(engine) as db:
            pins = _pins(db)
            blobs = _known_answer_blobs(settings, db)
            latest = backups.latest_generation(db)
        verified = softhsm_backup.verify_backup(settings, src,
                                                _audit_pin(settings, pins).check_value)
        with transaction(engine) as db:
            recorded = backups.get_backup(db, verified.generation)
        overridden = rules.decide_restore(rules.RestoreFacts(
            generation=verified.generation, manifest_sha256=verified.manifest_sha256,
            backup_pins=_pin_facts(verified.pins), latest_generation=latest,
            recorded_sha256=None if recorded is None else recorded.manifest_sha256,
            inventory_pins=_pin_facts(pins.values())), force=force, where=verified.path)
        held = {pin.role for pin in verified.pins}
        report = softhsm_backup.restore(
            settings, verified, pins=[p for role, p in pins.items() if role in held],
            blobs=blobs, timeout=timeout, now=at)
        with transaction(engine) as db:
            trail.record(db, actor, "hsm.restore", "ok", at=at, detail={
                "generation": report.generation, "backup": verified.path.name,
                "forced": bool(overridden), "overridden": overridden,
                "checked_blob_count": report.checked_blobs,
                "checked_key_count": report.checked_keys})
    except MeterkeysError as exc:
        record_failure(engine, actor, "hsm.restore", exc, {"force_requested": force}, at)
        raise
    return report


def _pins(db: Session) -> dict[str, KeyPin]:
    return {p.role: KeyPin(p.role, p.label, p.key_id, p.check_value)
            for p in hsm_keys.all_pins(db)}


def _pin_facts(pins: Iterable[KeyPin]) -> dict[str, tuple[str, str, str]]:
    return {p.role: (p.label, p.key_id, p.check_value) for p in pins}


def _audit_pin(settings: Settings, pins: dict[str, KeyPin]) -> KeyPin:
    pin = pins.get(AUDIT_ROLE)
    if pin is None:
        raise BackupError(settings.token_dir, f"the inventory pins no {AUDIT_ROLE!r} key: "
                                              "backups are signed and checked with it; run "
                                              "meterkeys hsm init")
    return pin


def _known_answer_blobs(settings: Settings, db: Session) -> tuple[tuple[str, bytes], ...]:
    """Return (KEK label, blob) pairs: the storage KEK's canary first, then each KEK's samples.

    Raises:
        BackupError: the inventory has no canary for the storage KEK.
    """
    label = settings.storage_kek_label
    canary = kek_checks.get_kek_check(db, label)
    if canary is None:
        raise BackupError(settings.token_dir, f"the inventory has no kek_check canary for "
                                              f"{label!r}: cannot prove the backup holds it")
    out = [(label, bytes(canary.blob))]
    master = kek_checks.get_kek_check(db, settings.master_kek_label)
    if master is not None:
        out.append((settings.master_kek_label, bytes(master.blob)))
    for kek in (label, settings.master_kek_label):
        out += [(kek, blob) for blob in meters.sample_blobs(db, kek, SAMPLE_BLOBS)]
    return tuple(out)


# --- audit of administrative acts -----------------------------------------------------------------
def record_admin(engine: Engine, actor: Actor, action: str, outcome: str,
                 detail: dict[str, Any], at: datetime) -> None:
    """Audit one administrative act in its own transaction (details never hold secrets).

    Raises:
        AuditError: the detail looks like key material, or the trail is broken.
    """
    with transaction(engine) as db:
        trail.record(db, actor, action, outcome, detail=detail, at=at)


def record_failure(engine: Engine, actor: Actor, action: str, exc: MeterkeysError,
                   detail: dict[str, Any], at: datetime) -> None:
    """Audit a failed administrative act with its reason; never masks the failure itself.

    The caller re-raises ``exc``: an audit trail too broken to append to, or a reason the
    trail refuses (it looks like key material), must not hide it.
    """
    reason = _HEX_RUN.sub("…", str(exc))[:500]
    try:
        record_admin(engine, actor, action, "failed",
                     {**detail, "error": type(exc).__name__, "reason": reason}, at)
    except AuditError:
        return


def audit_init(engine: Engine, actor: Actor, report: InitReport, at: datetime) -> None:
    """Audit ``hsm init``: one ``hsm.init`` event, and one ``hsm.key.create`` per key made.

    Items are named with their state only (never a PIN or key value).

    Raises:
        AuditError: the trail is broken.
    """
    created = sorted(item for item, state in report.items.items() if state != "present")
    present = sorted(item for item, state in report.items.items() if state == "present")
    with transaction(engine) as db:
        trail.record(db, actor, "hsm.init", "ok", at=at,
                     detail={"created": created, "present": present})
        for role, label in report.created_keys:
            trail.record(db, actor, "hsm.key.create", "ok", at=at,
                         detail={"role": role, "label": label})


def audit_public_key(settings: Settings) -> str:
    """Return the PEM of the HSM audit key's public half.

    Raises:
        KeyNotFound: the token has no audit key.
    """
    with Hsm.open(settings).session() as hs:
        return hs.public_key_pem(settings.audit_key_label).decode("ascii")


def sign_checkpoint(settings: Settings, engine: Engine, actor: Actor,
                    now: datetime) -> AuditCheckpoint | None:
    """Audit the request, sign the head with the HSM audit key and hand it to the witness;
    None if nothing to sign.

    Raises:
        HsmError: the signature failed.
        AuditError: the head disagrees with the last event, or the witness refused the head
            (``lifecycle.audit.trail.checkpoint``).
    """
    with Hsm.open(settings).session() as hs, transaction(engine) as session:
        trail.record(session, actor, "audit.checkpoint", "ok", at=now)
        return trail.checkpoint(session, hs, settings, now)


def verify_trail(settings: Settings, engine: Engine, public_key_pem: str | None = None) -> int:
    """Verify the whole audit trail on one snapshot against the pinned audit key and the file
    witness; return the number of events.

    ``public_key_pem`` defaults to the token's audit key; either way its fingerprint must be
    the one ``hsm init`` pinned. The witness is read before the snapshot is taken, so that every
    head it holds has committed (``lifecycle.audit.trail.verify``).

    Raises:
        AuditError: naming the first bad event or missing head; or no audit key is pinned.
        KeyNotFound: no public key given and the token has no audit key.
    """
    pem = public_key_pem if public_key_pem is not None else audit_public_key(settings)
    held = witness.file_of(settings).records()
    with snapshot(engine) as session:
        pin = hsm_keys.get_pin(session, AUDIT_ROLE)
        if pin is None:
            raise AuditError(None, f"the inventory pins no {AUDIT_ROLE!r} key to verify "
                                   "checkpoints with: run meterkeys hsm init")
        return trail.verify(session, pem, pin.check_value, held)


def note_verification(engine: Engine, actor: Actor, outcome: str, detail: dict[str, object],
                      now: datetime) -> None:
    """Audit a verification of the trail; a trail too broken to append to keeps its verdict.

    The verdict is the caller's to report, so an append that fails here is not raised.
    """
    try:
        with transaction(engine) as session:
            trail.record(session, actor, "audit.verify", outcome, detail=detail, at=now)
    except AuditError:
        return


def close_run(settings: Settings, engine: Engine, now: datetime) -> AuditCheckpoint | None:
    """Sign the head at the end of a flow run that failed, so its events (a rejected delivery,
    a refusal) are anchored and witnessed now rather than at the next checkpoint.

    Raises:
        HsmError: the signature failed.
        AuditError: the head disagrees with the last event, or the witness refused it.
    """
    with Hsm.open(settings).session() as hs, transaction(engine) as session:
        return trail.checkpoint(session, hs, settings, now)
