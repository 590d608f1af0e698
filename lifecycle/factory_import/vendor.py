"""Vendors: the DSO's RSA import key of each manufacturer, made and kept in the HSM."""

from __future__ import annotations

from lifecycle.config import Settings
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import ObjectClass
from lifecycle.inventory import vendors
from lifecycle.inventory.db import Engine, transaction

IMPORT_KEY_BITS = 3072  # NIST SP 800-57 Part 1 Table 2: 128-bit security strength


def import_key_label(vendor: str) -> str:
    """Return the HSM label of a vendor's import key pair."""
    return f"meterkeys-import-{vendor}"


def ensure_import_key(engine: Engine, settings: Settings, vendor: str) -> tuple[bytes, str]:
    """Generate the vendor's import key pair unless it exists; return (public PEM, OAEP hash).

    The OAEP hash is the strongest the HSM can unwrap with (``HsmSession.probe_oaep_hash``).

    Raises:
        InventoryError: unknown vendor.
        HsmError: the HSM refused to make or use the key.
    """
    label = import_key_label(vendor)
    with transaction(engine) as session:
        vendors.get_vendor(session, vendor)
    with Hsm.open(settings).session() as s:
        if not s.has_key(label, ObjectClass.PRIVATE_KEY):
            s.generate_token_rsa(label, IMPORT_KEY_BITS)
        pem = s.public_key_pem(label)
        oaep = s.probe_oaep_hash(label, pem)
    with transaction(engine) as session:
        vendors.set_import_key(session, vendor, label, oaep)
    return pem, oaep


def import_public_pem(settings: Settings, label: str) -> str:
    """Return the PEM of an import key's public half, read from the HSM.

    Raises:
        KeyNotFound: no such key pair.
    """
    with Hsm.open(settings).session() as s:
        return s.public_key_pem(label).decode()
