"""Principals' smart cards: a P-256 key on a PKCS#11 token other than the installation's HSM.

A principal's private key signs requests (``lifecycle.identity.signers.Pkcs11Signer``); it
never leaves the card. This module opens the card's token with the card's own PIN for each
operation (a card is used a few times per command, and a session held open would keep the
card logged in), signs a SHA-256 digest with ``CKM_ECDSA`` and returns the raw ``r || s``
(PKCS#11 v2.40 §2.3.1), or generates a key pair there and returns its public PEM.

The card is a separate token with a separate PIN: the HSM's user PIN gives no access to it.
PKCS#11 errors are translated here (``lifecycle.hsm.boundary``) and go no further.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from lifecycle.errors import ConfigError, KeyNotFound, PermanentHsmError
from lifecycle.hsm.boundary import translated

P256 = "secp256r1"


@contextlib.contextmanager
def _card(module: Path, token_label: str, pin: str) -> Iterator[Any]:
    with translated("open smart card", token_label):
        lib = pkcs11.lib(str(module))
        try:
            token = lib.get_token(token_label=token_label)
        except px.NoSuchToken:
            raise ConfigError(f"no smart card token labelled {token_label!r} in {module}") from None
        session = token.open(rw=True, user_pin=pin)
    try:
        yield session
    finally:
        with contextlib.suppress(Exception), translated("close smart card", token_label):
            session.close()


def _one(session: Any, object_class: ObjectClass, key_label: str) -> Any:
    found = list(session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: key_label}))
    if not found:
        raise KeyNotFound("find card key", "no such key", key_label)
    if len(found) > 1:
        raise PermanentHsmError("find card key", "several objects carry the label", key_label)
    return found[0]


def sign_digest(module: Path, token_label: str, key_label: str, pin: str,
                digest: bytes) -> bytes:
    """Sign a SHA-256 digest with the card's EC key (``CKM_ECDSA``); return raw ``r || s``.

    Raises:
        ConfigError: no token with that label.
        KeyNotFound: no private key with that label on the card.
        HsmError: wrong PIN, or the card refused to sign.
    """
    with _card(module, token_label, pin) as session, translated("card ECDSA sign", key_label):
        private = _one(session, ObjectClass.PRIVATE_KEY, key_label)
        return bytes(private.sign(digest, mechanism=Mechanism.ECDSA))


def public_pem(module: Path, token_label: str, key_label: str, pin: str) -> str:
    """Return the SubjectPublicKeyInfo PEM of the card's EC key pair.

    Raises:
        ConfigError: no token with that label.
        KeyNotFound: no public key with that label on the card.
        HsmError: wrong PIN, or the card could not be read.
    """
    with _card(module, token_label, pin) as session, translated("card public key", key_label):
        der = encode_ec_public_key(_one(session, ObjectClass.PUBLIC_KEY, key_label))
    key = serialization.load_der_public_key(der)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def generate_p256(module: Path, token_label: str, key_label: str, pin: str) -> str:
    """Generate a P-256 key pair on the card (private: sensitive, never extractable, SIGN
    only); return the public PEM.

    Raises:
        ConfigError: no token with that label.
        PermanentHsmError: a key with that label exists already, or generation failed.
    """
    with _card(module, token_label, pin) as session, translated("card key generation",
                                                                key_label):
        if list(session.get_objects({Attribute.LABEL: key_label})):
            raise PermanentHsmError("card key generation", "the label is taken", key_label)
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(P256)}, local=True)
        params.generate_keypair(
            store=True, label=key_label,
            public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
            private_template={Attribute.SIGN: True, Attribute.SENSITIVE: True,
                              Attribute.EXTRACTABLE: False, Attribute.TOKEN: True,
                              Attribute.PRIVATE: True, Attribute.DECRYPT: False,
                              Attribute.UNWRAP: False, Attribute.DERIVE: False})
    return public_pem(module, token_label, key_label, pin)
