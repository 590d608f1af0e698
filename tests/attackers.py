"""What the attackers of the tests hold, made with plain python-pkcs11 (never meterkeys' API)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pkcs11
from pkcs11 import Attribute
from pkcs11 import exceptions as px

from lifecycle.config import Settings


@contextlib.contextmanager
def pin_holder_session(settings: Settings, **options: Any) -> Iterator[Any]:
    """A plain python-pkcs11 session on the token, logged in with the user PIN (the PIN
    holder's view); ``options`` go to ``token.open`` (``rw``, ``attribute_mapper``)."""
    token = pkcs11.lib(str(settings.module_path)).get_token(token_label=settings.token_label)
    try:
        session = token.open(user_pin=settings.user_pin(), **options)
    except px.UserAlreadyLoggedIn:  # login is per application: this process already holds it
        session = token.open(**options)
    try:
        yield session
    finally:
        session.close()  # ends the attacker's session objects


def allowed_mechanisms_mapper() -> Any:
    """A python-pkcs11 attribute mapper that also knows CKA_ALLOWED_MECHANISMS (a CK_ULONG
    array), so the attacker can repeat meterkeys' unwrap templates exactly."""
    mapper = pkcs11.attributes.AttributeMapper()
    mapper.register_handler(
        Attribute.ALLOWED_MECHANISMS,
        lambda mechs: b"".join(int(m).to_bytes(8, "little") for m in mechs),
        lambda raw: [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)])
    return mapper


@contextlib.contextmanager
def pin_holder_with_templates(settings: Settings) -> Iterator[Any]:
    """``pin_holder_session`` (read-write) whose attribute mapper knows
    CKA_ALLOWED_MECHANISMS: the PIN holder repeating meterkeys' unwrap templates exactly."""
    with pin_holder_session(settings, rw=True,
                            attribute_mapper=allowed_mechanisms_mapper()) as session:
        yield session
