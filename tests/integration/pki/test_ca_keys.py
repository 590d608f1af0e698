"""A CA key in the main token is sign-only and never leaves the HSM: the PIN holder's attempts,
with plain python-pkcs11, are refused."""

from __future__ import annotations

from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px

from lifecycle.inventory import hsm_keys
from lifecycle.inventory.db import transaction
from lifecycle.pki import profiles
from tests.attackers import pin_holder_session

from .conftest import Pki


def _refused(attempt: Any) -> bool:
    try:
        attempt()
    except (px.PKCS11Error, AttributeError, NotImplementedError):
        return True
    return False


@pytest.mark.parametrize("ca", [profiles.DEVICE_P256, profiles.FIRMWARE])
def test_a_ca_key_is_sign_only_and_non_extractable(pki: Pki, ca: str) -> None:
    fleet = pki.fleet
    with transaction(fleet.engine) as db:  # type: ignore[attr-defined]
        pin = hsm_keys.get_pin(db, profiles.key_role(ca, 1))
    assert pin is not None
    with pin_holder_session(fleet.settings, rw=True) as session:  # type: ignore[attr-defined]
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=pin.label)
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
        assert not (key[Attribute.DECRYPT] or key[Attribute.DERIVE] or key[Attribute.UNWRAP])
        assert _refused(lambda: key[Attribute.VALUE])  # CKR_ATTRIBUTE_SENSITIVE
        wrapper = session.generate_key(KeyType.AES, 256, store=False,
                                       template={Attribute.WRAP: True})
        try:
            assert _refused(lambda: wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        finally:
            wrapper.destroy()
        assert _refused(lambda: key.decrypt(b"\x00" * 64))
        assert _refused(lambda: key.derive_key(KeyType.GENERIC_SECRET, 256,
                                               mechanism=Mechanism.ECDH1_DERIVE,
                                               mechanism_param=(0, None, b"\x04" + b"\x00" * 64)))
        assert _refused(lambda: key.__setitem__(Attribute.DECRYPT, True))
        assert _refused(lambda: key.__setitem__(Attribute.EXTRACTABLE, True))
        assert _refused(lambda: key.copy({Attribute.EXTRACTABLE: True}))
        assert _refused(lambda: key.sign(b"data", mechanism=Mechanism.ECDSA_SHA256))
        assert _refused(lambda: key.destroy())
        # What it may do: ECDSA over a digest, nothing else.
        assert len(key.sign(b"\x00" * 32, mechanism=Mechanism.ECDSA)) == 64
