"""The PIN holder's attacks of issue 10, written as the attacker would: plain python-pkcs11.

The attacker holds the token's user PIN (every host that runs an import does) and the stored
blobs (read from the inventory). meterkeys' own API only makes the blobs and the victim keys;
every attack step is a plain PKCS#11 call. Each test asserts that no plaintext key comes out.
On the templates before issue 10 every one of them returned the meter key.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px

from lifecycle.config import Settings
from lifecycle.errors import HsmError, KeyPolicyError
from lifecycle.hsm import check
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import HsmSession, SessionKey
from lifecycle.hsm.templates import call_template, master_profile, transport_profile, usage_profile
from lifecycle.installation import steps
from tests.attackers import pin_holder_with_templates

OAEP_SHA1 = (Mechanism.SHA_1, pkcs11.MGF.SHA1, None)  # the only OAEP SoftHSM2 2.6.1 has
KW_IV = bytes.fromhex("A6A6A6A6A6A6A6A6")  # RFC 3394 §2.2.3.1 default initial value


@dataclass
class Stored:
    """What the attacker has: blobs, the manifest's transport key, the batch's wrapped keys;
    and, to judge the attacks, the meter keys in clear (never given to the attacker)."""

    meter_keys: list[bytes]
    blobs: list[bytes]  # GUEK, GBEK, GAK under the storage KEK, master key under the master KEK
    import_label: str
    transport_ct: bytes
    batch: list[bytes]


@pytest.fixture(scope="module")
def stored(hsm: Hsm, settings: Settings) -> Stored:
    """A vendor delivery imported the way meterkeys imports it (RSA-OAEP, re-wrap to storage)."""
    label = f"attack-import-{uuid.uuid4().hex[:8]}"
    transport = secrets.token_bytes(32)
    meter_keys = [secrets.token_bytes(16) for _ in range(4)]
    batch = [aes_key_wrap(transport, key) for key in meter_keys]
    kek, master = settings.storage_kek_label, settings.master_kek_label
    with hsm.session() as s:
        s.generate_token_rsa(label, 2048)
        public = serialization.load_pem_public_key(s.public_key_pem(label))
        assert isinstance(public, rsa.RSAPublicKey)
        transport_ct = public.encrypt(transport, padding.OAEP(
            mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))  # noqa: S303
        with s.scoped(s.unwrap_rsa_oaep(label, transport_ct, oaep_hash="sha1")) as t:
            blobs = s.rewrap(t, batch, [kek, kek, kek, master])
    assert all(blobs)
    return Stored(meter_keys, [b for b in blobs if b], label, transport_ct, batch)


@pytest.fixture
def attacker(settings: Settings) -> Iterator[Any]:
    """A plain python-pkcs11 session on the token, logged in with the user PIN."""
    with pin_holder_with_templates(settings) as session:
        yield session


def _try(log: list[str], step: str, attempt: Callable[[], Any]) -> Any:
    """Run one attack step; None (and a note of the module's answer) when it is refused."""
    try:
        return attempt()
    except px.PKCS11Error as exc:
        log.append(f"{step}: {type(exc).__name__} {exc.args[0] if exc.args else ''}".strip())
        return None


def _kek(session: Any, label: str) -> Any:
    return session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)


def _refetch(key: Any) -> Any:
    """A fresh object for the same handle (python-pkcs11 offers methods by the flags)."""
    return next(o for o in key.session.get_objects({Attribute.CLASS: key.object_class})
                if o.handle == key.handle)


def _kw_unwrap_with_oracle(decrypt_block: Callable[[bytes], bytes], wrapped: bytes) -> bytes | None:
    """Invert RFC 3394 (§2.2.2) with a raw AES block-decrypt oracle."""
    n = len(wrapped) // 8 - 1
    a, r = wrapped[:8], [wrapped[8 * (i + 1):8 * (i + 2)] for i in range(n)]
    for j in range(5, -1, -1):
        for i in range(n, 0, -1):
            t = (n * j + i).to_bytes(8, "big")
            b = decrypt_block(bytes(x ^ y for x, y in zip(a, t, strict=True)) + r[i - 1])
            a, r[i - 1] = b[:8], b[8:]
    return b"".join(r) if a == KW_IV else None


def _decrypt_oracle(key: Any, log: list[str]) -> Callable[[bytes], bytes] | None:
    """Make a key an AES-ECB decrypt oracle: use it, flip CKA_DECRYPT on it, or copy it so."""
    def usable(k: Any) -> Callable[[bytes], bytes] | None:
        if not hasattr(k, "decrypt"):  # CKA_DECRYPT false: python-pkcs11 offers no decrypt
            return None
        if _try(log, "ECB decrypt", lambda: k.decrypt(bytes(16), mechanism=Mechanism.AES_ECB)):
            return lambda block: bytes(k.decrypt(block, mechanism=Mechanism.AES_ECB))
        return None

    def flip() -> Any:
        key[Attribute.DECRYPT] = True
        return _refetch(key)

    for candidate in (lambda: key, flip,
                      lambda: key.copy({Attribute.DECRYPT: True, Attribute.TOKEN: False})):
        k = _try(log, "make a decrypt oracle", candidate)
        oracle = usable(k) if k is not None else None
        if oracle is not None:
            return oracle
    return None


def _known_key(session: Any) -> tuple[bytes, Any]:
    value = secrets.token_bytes(32)
    return value, session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: value, Attribute.TOKEN: False, Attribute.WRAP: True,
        Attribute.UNWRAP: True, Attribute.EXTRACTABLE: True})


def test_a_unwrap_a_blob_as_non_sensitive_and_read_it(attacker: Any, settings: Settings,
                                                       stored: Stored) -> None:
    log: list[str] = []
    for blob in stored.blobs[:1]:
        key = _try(log, "unwrap SENSITIVE=False", lambda b=blob: _kek(
            attacker, settings.storage_kek_label).unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.AES, b, mechanism=Mechanism.AES_KEY_WRAP,
            template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                      Attribute.EXTRACTABLE: True}))
        value = _try(log, "read CKA_VALUE", lambda k=key: bytes(k[Attribute.VALUE])) \
            if key is not None else None
        assert value is None, "attack A read a meter key"
    assert any("TemplateInconsistent" in line for line in log), log


def test_b_unwrap_with_meterkeys_template_then_wrap_under_a_known_key(
        attacker: Any, settings: Settings, stored: Stored) -> None:
    log: list[str] = []
    value, known = _known_key(attacker)
    kek = _kek(attacker, settings.storage_kek_label)
    recovered = []
    for template in ({Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                      Attribute.EXTRACTABLE: True}, call_template(usage_profile())):
        key = _try(log, "unwrap", lambda t=template: kek.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.AES, stored.blobs[0],
            mechanism=Mechanism.AES_KEY_WRAP, template=t))
        if key is None:
            continue
        wrapped = _try(log, "wrap under the known key", lambda k=key: bytes(
            known.wrap_key(k, mechanism=Mechanism.AES_KEY_WRAP)))
        if wrapped is not None:
            recovered.append(aes_key_unwrap(value, wrapped))
    assert recovered == [], "attack B read a meter key"
    assert any("KeyUnextractable" in line for line in log), log


def test_c_two_meter_keys_wrap_one_under_the_other(attacker: Any, settings: Settings,
                                                    stored: Stored) -> None:
    log: list[str] = []
    storage = _kek(attacker, settings.storage_kek_label)
    master = _kek(attacker, settings.master_kek_label)
    keys = [storage.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob,
                               mechanism=Mechanism.AES_KEY_WRAP,
                               template=call_template(usage_profile()))
            for blob in stored.blobs[:3]]
    keys.append(master.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, stored.blobs[3],
                                  mechanism=Mechanism.AES_KEY_WRAP,
                                  template=call_template(master_profile())))
    recovered = []
    for x in keys:
        for y in keys:
            if x is y:
                continue
            wrapper = y if hasattr(y, "wrap_key") else _try(log, "set WRAP", lambda y=y: (
                y.__setitem__(Attribute.WRAP, True), _refetch(y))[1])
            if wrapper is None:
                continue
            wrapped = _try(log, "wrap x under y", lambda w=wrapper, x=x: bytes(
                w.wrap_key(x, mechanism=Mechanism.AES_KEY_WRAP)))
            oracle = _decrypt_oracle(y, log) if wrapped is not None else None
            if oracle is not None and wrapped is not None:
                recovered.append(_kw_unwrap_with_oracle(oracle, wrapped))
    assert [r for r in recovered if r] == [], "attack C read a meter key"
    assert any("KeyUnextractable" in line for line in log), log
    assert any("0x1b" in line.lower() for line in log), log  # CKR_ACTION_PROHIBITED


def test_d_give_the_kek_decrypt_and_undo_the_key_wrap(attacker: Any, settings: Settings,
                                                      stored: Stored) -> None:
    log: list[str] = []
    for label, blob in ((settings.storage_kek_label, stored.blobs[0]),
                        (settings.master_kek_label, stored.blobs[3])):
        oracle = _decrypt_oracle(_kek(attacker, label), log)
        assert oracle is None, f"attack D made {label!r} an ECB oracle"
        assert blob  # the blob stays opaque
    # C_SetAttributeValue: CKR_ACTION_PROHIBITED (not modifiable); C_CopyObject: refused too.
    assert sum("0x1b" in line.lower() for line in log) >= 2, log


def test_e_unwrap_the_transport_key_as_non_sensitive(attacker: Any, stored: Stored) -> None:
    log: list[str] = []
    private = attacker.get_key(object_class=ObjectClass.PRIVATE_KEY, label=stored.import_label)
    key = _try(log, "OAEP unwrap SENSITIVE=False", lambda: private.unwrap_key(
        ObjectClass.SECRET_KEY, KeyType.AES, stored.transport_ct,
        mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA1,
        template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                  Attribute.EXTRACTABLE: True}))
    assert key is None, "attack E read the transport key"
    # E': the import public key may not wrap (no WRAP, and not modifiable to gain it).
    public = attacker.get_key(object_class=ObjectClass.PUBLIC_KEY, label=stored.import_label)
    assert not hasattr(public, "wrap_key") and not hasattr(public, "encrypt")
    assert _try(log, "set WRAP on the public key",
                lambda: public.__setitem__(Attribute.WRAP, True)) is None
    assert any("TemplateInconsistent" in line for line in log), log


def test_e2_residual_gap_batch_file_holder_reads_batch_keys(attacker: Any, hsm: Hsm,
                                                            stored: Stored) -> None:
    """Documents a limit SoftHSM2 cannot close (README "What the HSM enforces").

    A PIN holder with a vendor's batch file unwraps the transport key exactly as meterkeys
    must (the import key's template allows that), then a meter key under it as non-sensitive:
    the transport key cannot carry its own unwrap template, because SoftHSM2 2.6.1 refuses an
    unwrap template nested in an unwrap template. If this test fails, the module closed the
    gap: give the transport profile a nested in-flight template and update the README.
    """
    private = attacker.get_key(object_class=ObjectClass.PRIVATE_KEY, label=stored.import_label)
    transport = private.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, stored.transport_ct,
                                   mechanism=Mechanism.RSA_PKCS_OAEP,
                                   mechanism_param=OAEP_SHA1,
                                   template=call_template(transport_profile()))
    key = transport.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, stored.batch[0],
                               mechanism=Mechanism.AES_KEY_WRAP,
                               template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                                         Attribute.EXTRACTABLE: True})
    assert bytes(key[Attribute.VALUE]) == stored.meter_keys[0]
    assert check.probe(hsm)["nested_unwrap_template"] is False


def test_f_substitute_the_kek_under_its_label_and_id(attacker: Any, hsm: Hsm, settings: Settings,
                                                     engine: Any, stored: Stored) -> None:
    steps.init(settings, engine, make_pin_files=False)  # pins the genuine keys
    log: list[str] = []
    kek = _kek(attacker, settings.storage_kek_label)
    key_id = bytes(kek[Attribute.ID])
    assert _try(log, "destroy the KEK", kek.destroy) is None
    value = secrets.token_bytes(32)
    impostor = attacker.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: value, Attribute.TOKEN: True, Attribute.PRIVATE: True,
        Attribute.LABEL: settings.storage_kek_label, Attribute.ID: key_id,
        Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False})
    try:
        with pytest.raises(KeyPolicyError, match="2 objects carry this label"):
            steps.check_keys(settings, engine)
        status = steps.status(settings, engine)[f"key {settings.storage_kek_label!r}"]
        assert status.startswith("REFUSED"), status
        made: list[bytes | None] = []
        with hsm.raw_session() as raw:
            fresh = HsmSession(raw, settings)  # a process starting now: nothing cached
            transport = secrets.token_bytes(32)
            with fresh.scoped(_unwrap_known(raw, transport)) as t, \
                    pytest.raises(HsmError):
                made = fresh.rewrap(t, [aes_key_wrap(transport, bytes(16))],
                                    [settings.storage_kek_label])
        assert made == []  # no blob is ever made under the attacker's key
    finally:
        impostor.destroy()  # the attacker's object is destroyable; the genuine KEK is not
    assert any("0x1b" in line.lower() for line in log), log
    steps.check_keys(settings, engine)


def _unwrap_known(raw: Any, value: bytes) -> Any:
    """A session transport key of known value, made by plain python-pkcs11 for the test."""
    obj = raw.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                             Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: False,
                             Attribute.VALUE: value, Attribute.UNWRAP: True})
    return SessionKey(obj, 256)
