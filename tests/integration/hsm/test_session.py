"""The PKCS#11 layer against a real SoftHSM2 token: protection attributes, key wrap (RFC 3394 and
RFC 5649), RSA-OAEP import, ECDSA, AES-GCM (DLMS Green Book known answer), error translation and
the process model (login per process, no use after fork)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.keywrap import aes_key_wrap, aes_key_wrap_with_padding
from pkcs11 import Attribute, KeyType

from lifecycle.config import Settings
from lifecycle.errors import (
    HsmError,
    IntegrityError,
    KeyNotFound,
    KeyPolicyError,
    PermanentHsmError,
)
from lifecycle.hsm import boundary, keyring
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import OAEP_MECHANISMS, HsmSession, ObjectClass, SessionKey

PADS = [pytest.param(False, id="rfc3394"), pytest.param(True, id="rfc5649")]
VECTORS = json.loads((Path(__file__).parents[2] / "data" / "dlms_gcm.json").read_text())


def _hex(name: str, field: str) -> bytes:
    return bytes.fromhex(VECTORS[name][field])


def _flip(blob: bytes, index: int = 5) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1:]


def _import_test_key(s: HsmSession, value: bytes) -> SessionKey:
    """Create a session (never token) AES key of published test-vector bytes, for KATs only.

    The layer deliberately has no import of clear key bytes; the test reaches python-pkcs11
    directly, under the layer's call lock.
    """
    template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: False, Attribute.VALUE: value, Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: True, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
        Attribute.WRAP: True, Attribute.UNWRAP: True,
    }
    with boundary.CALL_LOCK:
        obj = s._session.create_object(template)
    return SessionKey(obj, len(value) * 8)


@pytest.fixture
def session(hsm: Hsm) -> Iterator[HsmSession]:
    with hsm.session() as s:
        yield s


# --- long-lived keys --------------------------------------------------------------------------
def test_storage_kek_is_token_sensitive_non_extractable(session: HsmSession,
                                                        settings: Settings) -> None:
    assert session.key_attributes(settings.storage_kek_label) == {
        "token": True, "sensitive": True, "extractable": False}


@pytest.mark.parametrize("role", ["storage-kek", "storage-kek-master", "blob-mac",
                                  "audit-signing"])
def test_long_lived_keys_meet_their_policy(session: HsmSession, settings: Settings,
                                           role: str) -> None:
    label = keyring.role_labels(settings)[role]
    kind = keyring.kind_of_role(role)
    session.check_key(label, kind)
    (shown, *other) = session.describe_key(label, kind).values()
    assert shown["CKA_MODIFIABLE"] == shown["CKA_COPYABLE"] == shown["CKA_DESTROYABLE"] == "false"
    assert shown["CKA_EXTRACTABLE"] == "false" and shown["CKA_SENSITIVE"] == "true"
    assert shown["CKA_ALLOWED_MECHANISMS"] != "absent (any mechanism)"
    assert all(half["CKA_MODIFIABLE"] == "false" for half in other)


def test_check_value_is_deterministic(session: HsmSession, settings: Settings) -> None:
    for role, label in keyring.role_labels(settings).items():
        kind = keyring.kind_of_role(role)
        assert session.check_key(label, kind) == session.check_key(label, kind)


def test_mac_and_verify_mac(session: HsmSession, settings: Settings) -> None:
    label = settings.blob_mac_label
    messages = [b"meter 1 key 0 v1", b"meter 1 key 1 v1", b""]
    tags = session.mac(label, messages)
    assert [len(t) for t in tags] == [16, 16, 16] and len(set(tags)) == 3
    assert session.mac(label, messages) == tags
    assert session.verify_mac(label, messages, tags) == [True, True, True]
    assert session.verify_mac(label, messages, [tags[1], _flip(tags[1]), tags[2]]) == \
        [False, False, True]
    with pytest.raises(PermanentHsmError):
        session.verify_mac(label, messages, tags[:2])
    with pytest.raises(KeyPolicyError, match="CKA_SIGN is false"):
        session.mac(settings.storage_kek_label, messages)


# --- AES key wrap -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [128, 256])
def test_generate_wrap_unwrap_round_trip(session: HsmSession, settings: Settings,
                                         bits: int) -> None:
    kek = settings.storage_kek_label
    with session.scoped(session.generate_session_aes(bits)) as key:
        blob = session.wrap_aes(kek, key)
        # AES key wrap is deterministic: the same key under the same KEK gives the same blob.
        assert session.wrap_aes(kek, key) == blob
        # The KEK's CKA_ALLOWED_MECHANISMS is [AES_KEY_WRAP]: RFC 5649 is refused.
        with pytest.raises(PermanentHsmError, match="MechanismInvalid"):
            session.wrap_aes(kek, key, pad=True)
    assert len(blob) == bits // 8 + 8
    iv, aad = bytes(12), b"aad"
    with session.scoped(session.unwrap_stored(kek, blob)) as again:
        # Out of storage the key serves AES-GCM only and can never be wrapped again.
        sealed = session.gcm_encrypt(again, iv, aad, b"meterkeys")
        assert session.gcm_decrypt(again, iv, aad, sealed) == b"meterkeys"
        with pytest.raises(PermanentHsmError, match="KeyUnextractable"):
            session.wrap_aes(kek, again)
    with session.scoped(session.generate_session_aes(bits)) as other:
        assert session.wrap_aes(kek, other) != blob


def test_rfc3394_known_answer(session: HsmSession) -> None:
    kek = _import_test_key(session, _hex("rfc3394_4_1", "kek"))
    wrapped = _hex("rfc3394_4_1", "wrapped")
    with session.scoped(kek), session.scoped(session.unwrap_aes(kek, wrapped)) as key:
        assert session.wrap_aes(kek, key) == wrapped


def test_rfc5649_matches_software(session: HsmSession) -> None:
    kek_bytes, key_bytes = secrets.token_bytes(32), secrets.token_bytes(16)
    wrapped = aes_key_wrap_with_padding(kek_bytes, key_bytes)
    kek = _import_test_key(session, kek_bytes)
    with session.scoped(kek), session.scoped(session.unwrap_aes(kek, wrapped, pad=True)) as key:
        assert session.wrap_aes(kek, key, pad=True) == wrapped


@pytest.mark.parametrize("master", [False, True], ids=["storage-kek", "master-kek"])
def test_tampered_blob_fails_integrity_check(session: HsmSession, settings: Settings,
                                             master: bool) -> None:
    kek = settings.master_kek_label if master else settings.storage_kek_label
    with session.scoped(session.generate_session_aes(128)) as key:
        blob = session.wrap_aes(kek, key)
    session.destroy(session.unwrap_stored(kek, blob))
    with pytest.raises(IntegrityError) as info:
        session.unwrap_stored(kek, _flip(blob))
    assert info.value.label == kek
    assert blob.hex() not in str(info.value)


def test_rewrap_to_each_keys_kek_returns_none_for_tampered_entry(session: HsmSession,
                                                                 settings: Settings) -> None:
    value = secrets.token_bytes(32)
    meter_keys = [secrets.token_bytes(16) for _ in range(4)]
    wrapped = [aes_key_wrap(value, k) for k in meter_keys]
    storage, master = settings.storage_kek_label, settings.master_kek_label
    targets = [storage, storage, storage, master]
    with session.scoped(_import_test_key(session, value)) as transport:
        out = session.rewrap(transport, [*wrapped, _flip(wrapped[0])], [*targets, storage])
        with pytest.raises(PermanentHsmError, match="target KEKs"):
            session.rewrap(transport, wrapped, targets[:3])
    assert out[4] is None
    blobs = [b for b in out[:4] if b is not None]
    assert len(blobs) == 4 and len(set(blobs)) == 4
    for blob, kek in zip(blobs, targets, strict=True):
        session.destroy(session.unwrap_stored(kek, blob))
    # Each blob unwraps under its own KEK only.
    with pytest.raises(IntegrityError):
        session.unwrap_stored(master, blobs[0])
    with pytest.raises(IntegrityError):
        session.unwrap_stored(storage, blobs[3])


# --- RSA-OAEP import --------------------------------------------------------------------------
@pytest.fixture
def import_key(session: HsmSession) -> Iterator[tuple[str, rsa.RSAPublicKey, str]]:
    """A throw-away RSA import key pair on the token; yields (label, public key, OAEP hash)."""
    label = f"test-import-{uuid.uuid4().hex[:8]}"
    # Long-lived keys are non-destroyable: the pair stays on the test session's token.
    pin = session.generate_token_rsa(label, 2048)
    assert pin.role == f"import:{label}" and len(bytes.fromhex(pin.key_id)) == 16
    pem = session.public_key_pem(label)
    assert pin.check_value == hashlib.sha256(serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, rsa.RSAPublicKey)
    yield label, public, session.probe_oaep_hash(label, pem)
    with pytest.raises(PermanentHsmError, match="CKR_ACTION_PROHIBITED"):
        session.destroy_token_key(label, ObjectClass.PRIVATE_KEY)


def _oaep(name: str) -> padding.OAEP:
    algorithm: hashes.HashAlgorithm = (hashes.SHA256() if name == "sha256"
                                         else hashes.SHA1())  # noqa: S303 - SoftHSM2 OAEP
    return padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None)


def test_probe_picks_a_supported_oaep_hash(import_key: tuple[str, rsa.RSAPublicKey, str]) -> None:
    _label, _public, name = import_key
    # SoftHSM2 2.6.1 unwraps OAEP with SHA-1 only; another module may do SHA-256.
    assert name in OAEP_MECHANISMS


def test_rsa_oaep_unwrap_of_software_wrapped_transport_key(
        session: HsmSession, import_key: tuple[str, rsa.RSAPublicKey, str]) -> None:
    label, public, name = import_key
    transport, meter_key = secrets.token_bytes(32), secrets.token_bytes(16)
    encrypted = public.encrypt(transport, _oaep(name))
    with session.scoped(session.unwrap_rsa_oaep(label, encrypted, oaep_hash=name)) as t:
        # The RFC 3394 integrity check passes only if the HSM holds the same transport key.
        with session.scoped(session.unwrap_aes(t, aes_key_wrap(transport, meter_key))):
            pass
        with pytest.raises(IntegrityError):
            session.unwrap_aes(t, aes_key_wrap(secrets.token_bytes(32), meter_key))


def test_rsa_oaep_unwrap_under_wrong_key_pair_fails(
        session: HsmSession, import_key: tuple[str, rsa.RSAPublicKey, str]) -> None:
    label, _public, name = import_key
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    encrypted = stranger.encrypt(secrets.token_bytes(32), _oaep(name))
    with pytest.raises(IntegrityError) as info:
        session.unwrap_rsa_oaep(label, encrypted, oaep_hash=name)
    assert info.value.label == label


# --- ECDSA ------------------------------------------------------------------------------------
def test_ecdsa_signature_verifies_with_public_key(session: HsmSession,
                                                  settings: Settings) -> None:
    label = settings.audit_key_label
    public = serialization.load_pem_public_key(session.public_key_pem(label))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    digest = hashlib.sha256(b"audit checkpoint 42").digest()
    signature = session.sign_ecdsa(label, digest)
    public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        public.verify(signature, hashlib.sha256(b"audit checkpoint 43").digest(),
                      ec.ECDSA(Prehashed(hashes.SHA256())))


# --- AES-GCM: DLMS Green Book known answer ----------------------------------------------------
def test_gcm_green_book_known_answer(session: HsmSession) -> None:
    v = "green_book_gcm"
    # DLMS Green Book: IV = system title || invocation counter; AAD = SC || AK; 12-byte tag.
    iv = _hex(v, "system_title") + _hex(v, "invocation_counter")
    aad = _hex(v, "security_control") + _hex(v, "authentication_key")
    plaintext, expected = _hex(v, "plaintext"), _hex(v, "ciphertext") + _hex(v, "tag")
    with session.scoped(_import_test_key(session, _hex(v, "encryption_key"))) as ek:
        assert session.gcm_encrypt(ek, iv, aad, plaintext, 96) == expected
        assert session.gcm_decrypt(ek, iv, aad, expected, 96) == plaintext


@pytest.mark.parametrize("where", [pytest.param(0, id="ciphertext"), pytest.param(-1, id="tag")])
def test_gcm_tampered_apdu_fails_integrity_check(session: HsmSession, where: int) -> None:
    v = "green_book_gcm"
    iv = _hex(v, "system_title") + _hex(v, "invocation_counter")
    aad = _hex(v, "security_control") + _hex(v, "authentication_key")
    data = _hex(v, "ciphertext") + _hex(v, "tag")
    with session.scoped(_import_test_key(session, _hex(v, "encryption_key"))) as ek:
        with pytest.raises(HsmError) as info:
            session.gcm_decrypt(ek, iv, aad, _flip(data, where % len(data)), 96)
        # The session stays usable after the failed check.
        assert session.gcm_decrypt(ek, iv, aad, data, 96) == _hex(v, "plaintext")
    assert isinstance(info.value, IntegrityError), info.value


# --- error translation and process model ------------------------------------------------------
def test_missing_label_raises_key_not_found(session: HsmSession) -> None:
    missing = f"no-such-key-{uuid.uuid4().hex[:8]}"
    assert not session.has_key(missing)
    with session.scoped(session.generate_session_aes(128)) as key, \
            pytest.raises(KeyPolicyError) as info:
        session.wrap_aes(missing, key)
    assert info.value.label == missing
    with pytest.raises(KeyNotFound):
        session.mac(missing, [b"x"])
    with pytest.raises(KeyNotFound):
        session.sign_ecdsa(missing, bytes(32))
    with pytest.raises(KeyNotFound):
        session.public_key_pem(missing)


def _open_with_wrong_pin() -> tuple[str, str]:
    """Child side: open the session token (METERKEYS_HOME from the environment), wrong PIN."""
    from lifecycle.config import load_settings

    try:
        Hsm.open(load_settings(pin="not-the-user-pin-0815"))
    except HsmError as exc:
        return type(exc).__name__, exc.cause
    except Exception as exc:  # noqa: BLE001 - report anything else to the parent
        return type(exc).__name__, str(exc)
    return "opened", ""


def test_wrong_pin_is_permanent(settings: Settings) -> None:
    # Login is per process (reference pkcs11.md §2): the test needs a fresh process.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        kind, cause = pool.apply(_open_with_wrong_pin)
    assert (kind, cause) == ("PermanentHsmError", "PinIncorrect")
    assert issubclass(PermanentHsmError, HsmError)


def test_open_in_fork_child_is_refused(hsm: Hsm, settings: Settings) -> None:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 3
        try:
            try:
                Hsm.open(settings)
                code = 1
            except PermanentHsmError as exc:
                code = 0 if "fork" in exc.cause else 2
        finally:
            os._exit(code)
    status = _wait(pid, timeout=30)
    assert os.waitstatus_to_exitcode(status) == 0


def _wait(pid: int, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("fork child did not finish")
