"""Principals' private keys: a PEM file, or a key on a smart card; made, loaded, used to sign.

The private key is the principal: whoever signs with it acts under its name
(``lifecycle.principals.authorize``). So it is read only here, kept only in this process's
memory, and never written anywhere but the 0600 file ``generate`` makes. A passphrase or card
PIN is read from the argument or a file named in the settings, never from the command line.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from lifecycle.config import Settings
from lifecycle.errors import ConfigError, RequestError
from lifecycle.hsm import card
from lifecycle.identity import keys
from lifecycle.identity.request import Signer

__all__ = ["FileSigner", "Pkcs11Signer", "Signer", "from_settings", "generate"]

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PKCS11_PREFIX = "pkcs11:"
_URI = re.compile(r"pkcs11:token=([^;=]+);object=([^;=]+)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NO_KEY = ("no principal key: set METERKEYS_PRINCIPAL_KEY to your private key "
          "(meterkeys principal keygen)")


class FileSigner:
    """A principal's private key from a PKCS#8 PEM file (encrypted when it has a passphrase)."""

    def __init__(self, private: PrivateKey, path: Path | None = None) -> None:
        self._private = private
        self.path = path

    def __repr__(self) -> str:
        return f"FileSigner({self.path})"

    @classmethod
    def load(cls, path: Path, passphrase: bytes | None) -> FileSigner:
        """Load the private key of ``path``; it must be private to its owner.

        Raises:
            ConfigError: naming the path: missing, readable by others, wrong or missing
                passphrase, or not an EC P-256 or Ed25519 private key.
        """
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"principal key {path}: cannot read: {exc.strerror}") from None
        if mode & 0o077:
            raise ConfigError(f"principal key {path} is readable by others (mode "
                              f"{mode & 0o777:04o}): chmod 600 {path}")
        try:
            private = serialization.load_pem_private_key(data, password=passphrase)
        except TypeError:
            raise ConfigError(f"principal key {path}: encrypted, and no passphrase given "
                              "(or a passphrase given for a key that has none)") from None
        except ValueError:
            raise ConfigError(f"principal key {path}: not a PEM private key, or the "
                              "passphrase is wrong") from None
        if not _allowed(private):
            raise ConfigError(f"principal key {path}: only EC P-256 and Ed25519 keys are "
                              "allowed")
        assert isinstance(private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
        return cls(private, path)

    def public_key_pem(self) -> str:
        """Return the public key as SubjectPublicKeyInfo PEM."""
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def sign(self, message: bytes) -> bytes:
        """Sign: ECDSA with SHA-256 (DER) for P-256, raw Ed25519 otherwise."""
        if isinstance(self._private, ed25519.Ed25519PrivateKey):
            return self._private.sign(message)
        return self._private.sign(message, ec.ECDSA(hashes.SHA256()))


def _allowed(private: object) -> bool:
    return isinstance(private, ed25519.Ed25519PrivateKey) or (
        isinstance(private, ec.EllipticCurvePrivateKey)
        and isinstance(private.curve, ec.SECP256R1))


class Pkcs11Signer:
    """A principal's P-256 key on a smart card (a PKCS#11 token); it never leaves the card."""

    def __init__(self, module: Path, token_label: str, key_label: str, pin: str) -> None:
        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self._pin = pin

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self.module}, {self.token_label!r}, {self.key_label!r})"

    def public_key_pem(self) -> str:
        """Return the card key's public PEM (P-256 only).

        Raises:
            ConfigError: the card's key is not P-256.
            HsmError: the card could not be read.
        """
        pem = card.public_pem(self.module, self.token_label, self.key_label, self._pin)
        try:
            return keys.normalize_pem(pem, f"card key {self.key_label!r}")
        except RequestError as exc:
            raise ConfigError(str(exc)) from None

    def sign(self, message: bytes) -> bytes:
        """Sign SHA-256(message) on the card with CKM_ECDSA; return the DER signature.

        Raises:
            HsmError: the card refused to sign (wrong PIN, missing key).
        """
        raw = card.sign_digest(self.module, self.token_label, self.key_label, self._pin,
                               hashlib.sha256(message).digest())
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                    int.from_bytes(raw[half:], "big"))


def generate(out_dir: Path, name: str, kind: Literal["p256", "ed25519"],
             passphrase: bytes | None) -> tuple[Path, Path]:
    """Write a new key pair: ``<name>.key.pem`` (0600, PKCS#8, encrypted with the passphrase
    when one is given) and ``<name>.pub.pem``; return both paths.

    Raises:
        ConfigError: a file exists already (never overwritten), the name is not a file name,
            or the kind is unknown.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(f"principal name {name!r} cannot name a key file")
    private: PrivateKey
    if kind == "p256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ConfigError(f"unknown key kind {kind!r}: choose p256 or ed25519")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                encryption)
    key_path, pub_path = out_dir / f"{name}.key.pem", out_dir / f"{name}.pub.pem"
    for path in (key_path, pub_path):
        if path.exists():
            raise ConfigError(f"{path} exists: refusing to overwrite a key")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_new(key_path, pem, 0o600)
    _write_new(pub_path, FileSigner(private).public_key_pem().encode("ascii"), 0o644)
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise ConfigError(f"{path} exists: refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, mode)  # the umask may have narrowed it; a private key stays 0600 either way


def from_settings(settings: Settings, passphrase: bytes | None = None) -> Signer:
    """Return the signer the settings name: a PEM file, or ``pkcs11:token=T;object=O``.

    Raises:
        ConfigError: no principal key configured, a malformed URI, a missing PIN or
            passphrase file, or a key that cannot be loaded.
    """
    where = settings.principal_key
    if not where:
        raise ConfigError(NO_KEY)
    if where.startswith(PKCS11_PREFIX):
        match = _URI.fullmatch(where)
        if not match:
            raise ConfigError(f"principal key {where!r}: expected pkcs11:token=LABEL;object=LABEL")
        if settings.principal_key_pin_file is None:
            raise ConfigError("a smart-card principal key needs METERKEYS_PRINCIPAL_KEY_PIN_FILE")
        pin = _read_secret(settings.principal_key_pin_file, "smart card PIN")
        module = settings.principal_key_module or settings.module_path
        return Pkcs11Signer(module, match.group(1), match.group(2), pin)
    if passphrase is None and settings.principal_key_passphrase_file is not None:
        passphrase = _read_secret(settings.principal_key_passphrase_file,
                                  "key passphrase").encode("utf-8")
    return FileSigner.load(Path(where).expanduser(), passphrase)


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} file {path}: cannot read: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"{what} file {path} is empty")
    return text
