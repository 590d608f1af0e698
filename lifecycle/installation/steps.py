"""Administrative steps of an installation: token and keys, status, backup, restore, audit key.

These are what ``meterkeys hsm ...`` and ``meterkeys audit ...`` run: each combines the HSM, the
inventory and the audit trail, so that the command line never drives an HSM session or the
database itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import AuditError, BackupError
from lifecycle.hsm import provision, softhsm_backup
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.softhsm_backup import RestoreReport
from lifecycle.inventory import kek_checks, meters
from lifecycle.inventory.audit_events import AuditCheckpoint
from lifecycle.inventory.db import Engine, snapshot, transaction

CANARY_BITS = 128
SAMPLE_BLOBS = 8


@dataclass(frozen=True)
class InitReport:
    """What ``init`` found or made: item -> "created" or "present"."""

    items: dict[str, str]


def init(settings: Settings, engine: Engine, *, make_pin_files: bool) -> InitReport:
    """Create what is missing: PIN files (embedded token), the token, its long-lived keys, and
    the storage KEK's canary in the inventory. Idempotent.

    Raises:
        ConfigError: PINs missing or placeholders.
        HsmError: the token or a key could not be made.
    """
    items: dict[str, str] = {}
    if make_pin_files:
        made = {p.name for p in provision.generate_pin_files(settings)}
        for name in ("so.pin", "user.pin"):
            items[f"PIN file {name}"] = "created" if name in made else "present"
    created = provision.init_token(settings)
    items[f"token {settings.token_label!r}"] = "created" if created else "present"
    for label, state in provision.ensure_long_lived_keys(settings).items():
        items[f"key {label!r}"] = state
    canary = ensure_kek_check(settings, engine)
    items[f"KEK canary for {settings.storage_kek_label!r}"] = "created" if canary else "present"
    return InitReport(items)


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
    """Report the module, the token, its long-lived keys and the KEK canary (item -> value).

    Raises:
        ConfigError: no module configured.
        HsmError: the token could not be opened.
    """
    report = {"PKCS#11 module": str(settings.module_path)}
    if settings.is_softhsm:
        report["token directory"] = str(settings.token_dir)
    present = provision.token_exists(settings)
    report[f"token {settings.token_label!r}"] = "present" if present else "absent"
    if present:
        found = Hsm.open(settings).has_token_keys(settings.storage_kek_label,
                                                  settings.audit_key_label)
        for label, exists in found.items():
            report[f"key {label!r}"] = "present" if exists else "absent"
    with transaction(engine) as session:
        canary = kek_checks.get_kek_check(session, settings.storage_kek_label)
    report[f"KEK canary for {settings.storage_kek_label!r}"] = \
        "present" if canary is not None else "absent"
    return report


def backup(settings: Settings, engine: Engine, dest: Path, *, timeout: float = 10.0,
           now: datetime | None = None) -> Path:
    """Back up the embedded token (see ``lifecycle.hsm.softhsm_backup.backup``).

    Raises:
        BackupError: the inventory has no canary for the storage KEK.
        ConfigError, TokenBusy: see ``softhsm_backup.backup``.
    """
    with transaction(engine) as db:
        canary = kek_checks.get_kek_check(db, settings.storage_kek_label)
    if canary is None:
        raise BackupError(settings.token_dir, f"the inventory has no kek_check canary for "
                                              f"{settings.storage_kek_label!r}: run meterkeys "
                                              "hsm init")
    return softhsm_backup.backup(settings, bytes(canary.blob), dest, timeout=timeout, now=now)


def restore(settings: Settings, engine: Engine, src: Path, *, timeout: float = 10.0,
            now: datetime | None = None) -> RestoreReport:
    """Restore a backup after proving it holds the inventory's storage KEK.

    Raises:
        BackupError: no canary in the inventory, or see ``softhsm_backup.restore``.
    """
    label = settings.storage_kek_label
    with transaction(engine) as db:
        canary = kek_checks.get_kek_check(db, label)
        samples = meters.sample_blobs(db, label, SAMPLE_BLOBS)
    if canary is None:
        raise BackupError(settings.token_dir, f"the inventory has no kek_check canary for "
                                              f"{label!r}: cannot prove the backup holds it")
    return softhsm_backup.restore(settings, (bytes(canary.blob), *samples), src,
                                  timeout=timeout, now=now)


def audit_public_key(settings: Settings) -> str:
    """Return the PEM of the HSM audit key's public half.

    Raises:
        KeyNotFound: the token has no audit key.
    """
    with Hsm.open(settings).session() as hs:
        return hs.public_key_pem(settings.audit_key_label).decode("ascii")


def sign_checkpoint(settings: Settings, engine: Engine, actor: Actor,
                    now: datetime) -> AuditCheckpoint | None:
    """Audit the request and sign the head with the HSM audit key; None if nothing to sign.

    Raises:
        HsmError: the signature failed.
        AuditError: the head disagrees with the last event.
    """
    with Hsm.open(settings).session() as hs, transaction(engine) as session:
        trail.record(session, actor, "audit.checkpoint", "ok", at=now)
        return trail.checkpoint(session, hs, settings.audit_key_label, now)


def verify_trail(engine: Engine, public_key_pem: str) -> int:
    """Verify the whole audit trail on one snapshot; return the number of events.

    Raises:
        AuditError: naming the first bad event.
    """
    with snapshot(engine) as session:
        return trail.verify(session, public_key_pem)


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
