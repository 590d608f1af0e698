"""Principals' public keys: P-256 and Ed25519 only, fingerprints, verification; file signers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from lifecycle.config import load_settings
from lifecycle.errors import ConfigError, RequestError
from lifecycle.identity import keys, request, signers
from lifecycle.identity.signers import FileSigner, Pkcs11Signer


def _pem(private: object) -> bytes:
    public = private.public_key()  # type: ignore[attr-defined]
    return bytes(public.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.mark.parametrize("private", [
    pytest.param(ec.generate_private_key(ec.SECP384R1()), id="p384"),
    pytest.param(ec.generate_private_key(ec.SECP256K1()), id="secp256k1"),
    pytest.param(rsa.generate_private_key(public_exponent=65537, key_size=2048), id="rsa"),
])
def test_other_kinds_of_key_are_refused(private: object) -> None:
    with pytest.raises(RequestError, match="only EC P-256 and Ed25519"):
        keys.normalize_pem(_pem(private), "public_pem")
    with pytest.raises(RequestError):
        keys.fingerprint(_pem(private))


def test_not_a_key_is_refused_naming_where() -> None:
    with pytest.raises(RequestError, match="enrolment public_pem: not a PEM public key"):
        keys.normalize_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                           "enrolment public_pem")


@pytest.mark.parametrize("private", [
    pytest.param(ec.generate_private_key(ec.SECP256R1()), id="p256"),
    pytest.param(ed25519.Ed25519PrivateKey.generate(), id="ed25519"),
])
def test_p256_and_ed25519_sign_and_verify(private: object, tmp_path: Path) -> None:
    pem = keys.normalize_pem(_pem(private), "k")
    signer = FileSigner(private)  # type: ignore[arg-type]
    assert signer.public_key_pem() == pem
    signature = request.b64url(signer.sign(b"message"))
    keys.verify(pem, signature, b"message")
    with pytest.raises(RequestError, match="does not verify"):
        keys.verify(pem, signature, b"messagE")
    assert keys.fingerprint(pem).startswith("sha256:") and len(keys.fingerprint(pem)) == 50


def test_a_p256_raw_signature_is_not_accepted_for_der() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = keys.normalize_pem(_pem(private), "k")
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    r, s = decode_dss_signature(private.sign(b"m", ec.ECDSA(hashes.SHA256())))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    with pytest.raises(RequestError, match="does not verify"):
        keys.verify(pem, request.b64url(raw), b"m")


def test_fingerprint_ignores_the_pem_layout() -> None:
    pem = _pem(ec.generate_private_key(ec.SECP256R1())).decode()
    assert keys.fingerprint(pem) == keys.fingerprint(pem.replace("\n", "\r\n"))


def test_generate_writes_private_key_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    key, pub = signers.generate(tmp_path, "olga", "p256", b"a long passphrase")
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED" in key.read_bytes()
    signer = FileSigner.load(key, b"a long passphrase")
    assert signer.public_key_pem() == pub.read_text()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        signers.generate(tmp_path, "olga", "ed25519", None)
    with pytest.raises(ConfigError, match="passphrase is wrong"):
        FileSigner.load(key, b"another passphrase")
    with pytest.raises(ConfigError, match="no passphrase given"):
        FileSigner.load(key, None)
    assert "a long passphrase" not in repr(signer)


def test_load_refuses_a_key_others_can_read_and_a_weak_kind(tmp_path: Path) -> None:
    key, _ = signers.generate(tmp_path, "olga", "ed25519", None)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        FileSigner.load(key, None)
    weak = tmp_path / "p384.key.pem"
    weak.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(weak, 0o600)
    with pytest.raises(ConfigError, match=r"p384.key.pem: only EC P-256 and Ed25519"):
        FileSigner.load(weak, None)
    with pytest.raises(ConfigError, match="missing.pem: cannot read"):
        FileSigner.load(tmp_path / "missing.pem", None)


def test_from_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set METERKEYS_PRINCIPAL_KEY"):
        signers.from_settings(load_settings(principal_key=None))
    key, pub = signers.generate(tmp_path, "olga", "p256", b"passphrase-for-olga")
    phrase = tmp_path / "phrase"
    phrase.write_text("passphrase-for-olga\n")
    signer = signers.from_settings(load_settings(principal_key=str(key),
                                                 principal_key_passphrase_file=phrase))
    assert signer.public_key_pem() == pub.read_text()
    pin = tmp_path / "pin"
    pin.write_text("card-pin-1234\n")
    card = signers.from_settings(load_settings(
        principal_key="pkcs11:token=card;object=olga", principal_key_pin_file=pin,
        principal_key_module=tmp_path / "module.so"))
    assert isinstance(card, Pkcs11Signer)
    assert (card.module, card.token_label, card.key_label) == (tmp_path / "module.so", "card",
                                                               "olga")
    assert "card-pin" not in repr(card)
    with pytest.raises(ConfigError, match="expected pkcs11:token=LABEL;object=LABEL"):
        signers.from_settings(load_settings(principal_key="pkcs11:object=olga",
                                            principal_key_pin_file=pin))
    with pytest.raises(ConfigError, match="PIN_FILE"):
        signers.from_settings(load_settings(principal_key="pkcs11:token=card;object=olga"))
