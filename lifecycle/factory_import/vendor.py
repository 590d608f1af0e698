"""Vendors: onboarding, and the DSO's RSA import key of each manufacturer, made in the HSM.

``add_vendor`` and ``issue_import_key`` are the administrative acts of ``meterkeys vendor``: each
is audited with the acting principal (a refusal or failure too), with names and choices only,
never key material. ``ensure_import_key`` is their building block.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import AuditError, KeyPolicyError, MeterkeysError
from lifecycle.factory_import.reader import Mapping
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import IMPORT_ROLE_PREFIX, KeyPin
from lifecycle.hsm.session import ObjectClass
from lifecycle.inventory import hsm_keys, vendors
from lifecycle.inventory.db import Engine, transaction

_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")  # as the audit trail refuses (lifecycle.audit.chain)

IMPORT_KEY_BITS = 3072  # NIST SP 800-57 Part 1 Table 2: 128-bit security strength


def import_key_label(vendor: str) -> str:
    """Return the HSM label of a vendor's import key pair."""
    return f"meterkeys-import-{vendor}"


def ensure_import_key(engine: Engine, settings: Settings, vendor: str) -> tuple[bytes, str]:
    """Generate the vendor's import key pair unless it exists; return (public PEM, OAEP hash).

    A new pair is pinned in the inventory (role ``import:<vendor>``: label, CKA_ID, SHA-256 of
    its SubjectPublicKeyInfo). The OAEP hash is the strongest the HSM can unwrap with
    (``HsmSession.probe_oaep_hash``).

    Raises:
        KeyPolicyError: the token lacks the pinned pair (lost: restore a backup).
        InventoryError: unknown vendor.
        HsmError: the HSM refused to make or use the key.
    """
    pem, oaep, _made = _ensure_import_key(engine, settings, vendor)
    return pem, oaep


def _ensure_import_key(engine: Engine, settings: Settings,
                       vendor: str) -> tuple[bytes, str, KeyPin | None]:
    label = import_key_label(vendor)
    role = f"{IMPORT_ROLE_PREFIX}{vendor}"
    with transaction(engine) as session:
        vendors.get_vendor(session, vendor)
        pinned = hsm_keys.get_pin(session, role) is not None
    made: KeyPin | None = None
    with Hsm.open(settings).session() as s:
        if not s.has_key(label, ObjectClass.PRIVATE_KEY):
            if pinned:
                # A pinned key that vanished is lost, not missing: a new one would not be it.
                raise KeyPolicyError("import key", label, "missing from the token, yet the "
                                     "inventory pins it: restore a token backup")
            made = s.generate_token_rsa(label, IMPORT_KEY_BITS, role=role)
        pem = s.public_key_pem(label)
        oaep = s.probe_oaep_hash(label, pem)
    with transaction(engine) as session:
        if made is not None:
            hsm_keys.put_pin(session, made.role, made.label, made.key_id, made.check_value)
        vendors.set_import_key(session, vendor, label, oaep)
    return pem, oaep, made


def import_public_pem(settings: Settings, label: str) -> str:
    """Return the PEM of an import key's public half, read from the HSM.

    Raises:
        KeyNotFound: no such key pair.
    """
    with Hsm.open(settings).session() as s:
        return s.public_key_pem(label).decode()


def add_vendor(engine: Engine, actor: Actor, name: str, signing_key_pem: str, mapping: str,
               *, source: str, at: datetime) -> None:
    """Onboard a vendor (its manifest signing key and file mapping) and audit it.

    ``source`` names where the mapping came from, for error messages.

    Raises:
        BatchError: the mapping does not parse.
        InventoryError: a vendor of that name exists.
    """
    try:
        parsed = Mapping.parse(mapping, source)
        with transaction(engine) as session:
            vendors.add_vendor(session, name, signing_key_pem, mapping)
            trail.record(session, actor, "vendor.add", "ok", at=at,
                         detail={"vendor": name, "format": parsed.format})
    except MeterkeysError as exc:
        _record_failure(engine, actor, "vendor.add", name, exc, at)
        raise


def issue_import_key(engine: Engine, settings: Settings, actor: Actor, vendor: str, *,
                     at: datetime) -> tuple[bytes, str]:
    """Make (once) the vendor's import key pair, audited; return (public PEM, OAEP hash).

    Audits ``vendor.import-key`` every time, and ``hsm.key.create`` when the pair was made now.

    Raises:
        InventoryError: unknown vendor.
        HsmError: the HSM refused to make or use the key.
    """
    try:
        pem, oaep, made = _ensure_import_key(engine, settings, vendor)
        label = import_key_label(vendor)
        with transaction(engine) as session:
            if made is not None:
                trail.record(session, actor, "hsm.key.create", "ok", at=at,
                             detail={"role": made.role, "label": label})
            trail.record(session, actor, "vendor.import-key", "ok", at=at, detail={
                "vendor": vendor, "label": label, "oaep_hash": oaep,
                "created": made is not None})
    except MeterkeysError as exc:
        _record_failure(engine, actor, "vendor.import-key", vendor, exc, at)
        raise
    return pem, oaep


def _record_failure(engine: Engine, actor: Actor, action: str, vendor: str,
                    exc: MeterkeysError, at: datetime) -> None:
    # The caller re-raises: a trail that refuses the event must not hide the failure.
    detail: dict[str, Any] = {"vendor": vendor, "error": type(exc).__name__,
                              "reason": _HEX_RUN.sub("…", str(exc))[:500]}
    try:
        with transaction(engine) as session:
            trail.record(session, actor, action, "failed", detail=detail, at=at)
    except AuditError:
        return
