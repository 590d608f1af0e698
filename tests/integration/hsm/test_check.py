"""Pins, policy checks and the protection probe (``meterkeys hsm check``) on SoftHSM2 2.6.1."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, Mechanism

from lifecycle.config import Settings
from lifecycle.errors import KeyNotFound, KeyPolicyError, PermanentHsmError
from lifecycle.hsm import boundary, check, keyring
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.templates import STORAGE_KEK
from lifecycle.installation import steps
from lifecycle.inventory import hsm_keys
from lifecycle.inventory.db import transaction

# What SoftHSM2 2.6.1 enforces (README "What the HSM enforces"): all but doubly nested templates.
SOFTHSM_PROBE = {"modifiable_false": True, "copyable_false": True, "destroyable_false": True,
                 "unwrap_template": True, "allowed_mechanisms": True, "wrap_with_trusted": True,
                 "user_cannot_set_trusted": True, "nested_unwrap_template": False}


def test_probe_reports_what_softhsm2_enforces(hsm: Hsm) -> None:
    assert check.probe(hsm) == SOFTHSM_PROBE
    assert check.missing_mechanisms(hsm) == []


def test_init_pins_every_key_and_check_keys_passes(settings: Settings, engine: Any) -> None:
    steps.init(settings, engine, make_pin_files=False)
    with transaction(engine) as db:
        pins = {p.role: p for p in hsm_keys.all_pins(db)}
    assert set(pins) == {"storage-kek", "storage-kek-master", "blob-mac", "audit-signing"}
    assert all(len(bytes.fromhex(p.key_id)) == 16 for p in pins.values())
    assert len(pins["storage-kek"].check_value) == 48  # RFC 3394 wrap of a 16-byte key
    assert [p.role for p in steps.check_keys(settings, engine)] == sorted(pins)
    report = steps.hsm_check(settings, engine)
    assert not report.failed, [k.problem for k in report.keys]
    assert all(v == "pinned, verified" for k, v in steps.status(settings, engine).items()
               if k.startswith("key "))
    steps.init(settings, engine, make_pin_files=False)  # idempotent


@pytest.mark.parametrize("field", ["key_id", "check_value"])
def test_a_pin_that_differs_stops_everything(settings: Settings, hsm: Hsm, field: str) -> None:
    with hsm.session() as s:
        kek = settings.storage_kek_label
        pin = KeyPin("storage-kek", kek, s.key_id(kek, STORAGE_KEK), s.check_key(kek, STORAGE_KEK))
    wrong = dataclasses.replace(pin, **{field: "00" * (len(getattr(pin, field)) // 2)})
    with pytest.raises(KeyPolicyError) as info:
        check.verify_pins(settings, [wrong])
    assert kek in str(info.value) and ("CKA_ID" in str(info.value)) == (field == "key_id")
    check.verify_pins(settings, [pin])


def test_missing_pin_or_key_is_refused(settings: Settings, engine: Any) -> None:
    with pytest.raises(KeyPolicyError, match="not pinned in the inventory"):
        steps.check_keys(settings, engine)
    steps.init(settings, engine, make_pin_files=False)
    moved = settings.model_copy(update={"storage_kek_label": f"gone-{uuid.uuid4().hex[:6]}"})
    with pytest.raises(KeyPolicyError, match="configuration names another"):
        steps.check_keys(moved, engine)
    # The pinned KEK is gone from the token (here: the configuration points elsewhere):
    # hsm init must not make a new one while the inventory pins it.
    with pytest.raises(KeyPolicyError, match="missing from the token, and the inventory pins it"):
        steps.init(moved, engine, make_pin_files=False)
    with Hsm.open(settings).session() as s, pytest.raises(KeyNotFound):
        s.check_key(moved.storage_kek_label, STORAGE_KEK)


def test_a_weak_kek_is_named_with_its_attribute(settings: Settings, hsm: Hsm) -> None:
    label = f"weak-kek-{uuid.uuid4().hex[:6]}"
    with hsm.session() as s:
        with boundary.CALL_LOCK:  # a KEK as meterkeys made it before issue 10 (session object)
            s._session.generate_key(KeyType.AES, 256, label=label, store=False, template={
                Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.WRAP: True,
                Attribute.UNWRAP: True, Attribute.DECRYPT: True})
        with pytest.raises(KeyPolicyError) as info:
            s.check_key(label, STORAGE_KEK)
    message = str(info.value)
    assert message.startswith(f"storage KEK {label!r}: ")
    for phrase in ("CKA_DECRYPT is true; policy: false", "CKA_MODIFIABLE is true; policy: false",
                   "CKA_UNWRAP_TEMPLATE is absent", "CKA_ALLOWED_MECHANISMS is absent"):
        assert phrase in message


def test_unknown_role_and_mechanism_names(settings: Settings) -> None:
    with pytest.raises(KeyPolicyError):
        keyring.kind_of_role("nonsense")
    assert keyring.kind_of_role("import:acme").name == "import key"
    assert set(check.NEEDED_MECHANISMS.values()) >= {Mechanism.AES_CMAC, Mechanism.AES_GCM}
    assert issubclass(KeyPolicyError, PermanentHsmError)
