"""Principals' public keys: which kinds are allowed, their fingerprints, signature checks.

Two kinds only: EC P-256 (ECDSA with SHA-256, DER signatures, FIPS 186-5 and what smart cards
offer) and Ed25519 (RFC 8032, raw 64-byte signatures). Anything else (other curves, RSA, DSA)
is refused rather than weighed, so a key's strength is never a question at verification.

A fingerprint is ``sha256:`` and the base64url SHA-256 of the key's SubjectPublicKeyInfo DER:
the same key in any PEM layout has one fingerprint.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from lifecycle.errors import RequestError
from lifecycle.identity.request import b64url, unb64url

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def load(pem: str | bytes, where: str) -> PublicKey:
    """Load a public key of an allowed kind (EC P-256 or Ed25519).

    Raises:
        RequestError: not a PEM public key, or of another kind (naming ``where``).
    """
    data = pem.encode("ascii", errors="replace") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise RequestError(where, "not a PEM public key") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
    raise RequestError(where, f"a {kind} key; only EC P-256 and Ed25519 are allowed")


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def normalize_pem(pem: str | bytes, where: str) -> str:
    """Return the key as SubjectPublicKeyInfo PEM, refusing every kind but P-256 and Ed25519.

    Raises:
        RequestError: not a PEM public key of an allowed kind (naming ``where``).
    """
    key = load(pem, where)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def fingerprint(pem: str | bytes) -> str:
    """Return ``sha256:`` and the base64url SHA-256 of the key's SubjectPublicKeyInfo DER.

    Raises:
        RequestError: not a PEM public key of an allowed kind.
    """
    return "sha256:" + b64url(hashlib.sha256(_spki(load(pem, "public key"))).digest())


def verify(pem: str, signature: str, message: bytes) -> None:
    """Check a base64url signature over ``message`` under a principal's public key.

    Raises:
        RequestError: the key is not allowed, or the signature does not verify.
    """
    key = load(pem, "public key")
    raw = unb64url(signature, "signature")
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(raw, message)
        else:
            key.verify(raw, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise RequestError("signature", "does not verify under the principal's key") from None
