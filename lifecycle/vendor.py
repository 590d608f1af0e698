"""Vendors: the DSO's RSA import key of each manufacturer, made and kept in the HSM."""

from __future__ import annotations

from sqlalchemy import Engine

from lifecycle import inventory
from lifecycle.config import Settings

IMPORT_KEY_BITS = 3072  # NIST SP 800-57 Part 1 Table 2: 128-bit security strength


def ensure_import_key(engine: Engine, settings: Settings, vendor: str,
                      label: str) -> tuple[bytes, str]:
    """Generate the vendor's import key pair unless it exists; return (public PEM, OAEP hash).

    The OAEP hash is the strongest the HSM can unwrap with (``HsmSession.probe_oaep_hash``).

    Raises:
        InventoryError: unknown vendor.
        HsmError: the HSM refused to make or use the key.
    """
    from lifecycle.hsm import Hsm, ObjectClass

    with inventory.transaction(engine) as session:
        inventory.get_vendor(session, vendor)
    with Hsm.open(settings).session() as s:
        if not s.has_key(label, ObjectClass.PRIVATE_KEY):
            s.generate_token_rsa(label, IMPORT_KEY_BITS)
        pem = s.public_key_pem(label)
        oaep = s.probe_oaep_hash(label, pem)
    with inventory.transaction(engine) as session:
        record = inventory.get_vendor(session, vendor)
        record.import_key_label, record.oaep_hash = label, oaep
        session.add(record)
    return pem, oaep
