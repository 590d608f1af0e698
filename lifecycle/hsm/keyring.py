"""Long-lived keys: found by label and pinned CKA_ID, checked against policy, with check values.

A key is never trusted by its label alone (issue 10, attack F: a PIN holder can put a key of a
value they know under the KEK's label). A lookup wants exactly one object with the label, every
attribute its kind's policy requires (``lifecycle.hsm.templates``), and, once this process has
verified the inventory's pins (``trust``), the pinned CKA_ID and check value.

Check values are deterministic and public:
- a KEK: the RFC 3394 wrap of a fixed 16-byte key of known value (``CHECK_KEY``) under it;
- the MAC key: AES-CMAC (NIST SP 800-38B) of ``CHECK_MESSAGE``;
- a key pair: SHA-256 of the public half's SubjectPublicKeyInfo (DER).

This module works on python-pkcs11 sessions under the call lock and knows nothing of the
inventory: pins are passed in.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key

from lifecycle.config import Settings
from lifecycle.errors import KeyNotFound, KeyPolicyError
from lifecycle.hsm import native
from lifecycle.hsm.boundary import translated
from lifecycle.hsm.templates import (
    AUDIT_KEY,
    BLOB_MAC,
    CA_KEY,
    IMPORT_KEY,
    MASTER_KEK,
    STORAGE_KEK,
    Kind,
    call_template,
    in_flight_profile,
)

CHECK_KEY = b"meterkeys KCV v1"  # 16 bytes, public on purpose: the check value's plaintext
CHECK_MESSAGE = b"meterkeys blob MAC check value v1"
ROLE_KINDS = {"storage-kek": STORAGE_KEK, "storage-kek-master": MASTER_KEK,
              "blob-mac": BLOB_MAC, "audit-signing": AUDIT_KEY}
IMPORT_ROLE_PREFIX = "import:"
CA_ROLE_PREFIX = "ca:"  # ca:<CA name>:<generation>, one pin per CA key (lifecycle.pki)


@dataclass(frozen=True)
class KeyPin:
    """Which object a role is: label, CKA_ID (hex) and check value (hex), as recorded at init."""

    role: str
    label: str
    key_id: str
    check_value: str


def kind_of_role(role: str) -> Kind:
    """Return the kind of key a pinned role names.

    Raises:
        KeyPolicyError: an unknown role.
    """
    if role.startswith(IMPORT_ROLE_PREFIX):
        return IMPORT_KEY
    if role.startswith(CA_ROLE_PREFIX):
        return CA_KEY
    kind = ROLE_KINDS.get(role)
    if kind is None:
        raise KeyPolicyError("key", role, "unknown role in the pins")
    return kind


def role_labels(settings: Settings) -> dict[str, str]:
    """Return the configured label of every fixed role (import keys are pinned per vendor)."""
    return {"storage-kek": settings.storage_kek_label,
            "storage-kek-master": settings.master_kek_label,
            "blob-mac": settings.blob_mac_label, "audit-signing": settings.audit_key_label}


# --- pins this process has verified (per process: each HSM worker verifies its own) -------------
_TRUSTED: dict[str, KeyPin] = {}
_TRUSTED_LOCK = threading.Lock()


def trust(pins: Iterable[KeyPin]) -> None:
    """Remember verified pins: from now on lookups of these labels also check id and value."""
    with _TRUSTED_LOCK:
        for pin in pins:
            _TRUSTED[pin.label] = pin


def trusted_pin(label: str) -> KeyPin | None:
    """Return the verified pin of a label, if this process has one."""
    with _TRUSTED_LOCK:
        return _TRUSTED.get(label)


def trusted_pins() -> tuple[KeyPin, ...]:
    """Return every pin this process has verified (to hand to its HSM workers)."""
    with _TRUSTED_LOCK:
        return tuple(_TRUSTED.values())


def forget_trust() -> None:
    """Forget every verified pin (tests; a restored token)."""
    with _TRUSTED_LOCK:
        _TRUSTED.clear()


# --- reading and judging a key's attributes -----------------------------------------------------
def _raw(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return native.encode_ulongs([value])
    if isinstance(value, (list, tuple)):
        return native.encode_ulongs(value)
    return bytes(value)


def _name(attr: int) -> str:
    try:
        return f"CKA_{Attribute(attr).name}"
    except ValueError:
        return f"CKA_0x{attr:X}"


def _mechanisms(values: Iterable[int]) -> str:
    names = []
    for value in values:
        try:
            names.append(Mechanism(value).name)
        except ValueError:
            names.append(f"0x{value:X}")
    return "[" + ", ".join(names) + "]"


def read_attributes(session: Any, module_path: str, obj: Any,
                    policy: Mapping[int, Any]) -> dict[int, Any]:
    """Read every attribute a policy names: bools, mechanism lists, nested templates (raw)."""
    out: dict[int, Any] = {}
    for attr in policy:
        if attr == Attribute.UNWRAP_TEMPLATE:
            out[attr] = native.get_nested_template(session, module_path, obj.handle)
            continue
        raw = native.get_attribute(session, module_path, obj.handle, attr)
        if raw is None:
            out[attr] = None
        elif attr == Attribute.ALLOWED_MECHANISMS:
            out[attr] = native.decode_ulongs(raw)
        else:
            out[attr] = raw != b"\x00"
    return out


def violations(policy: Mapping[int, Any], found: Mapping[int, Any]) -> list[str]:
    """Return how found attributes fall short of a policy, one phrase each (empty: none)."""
    out = []
    for attr, wanted in policy.items():
        got = found.get(attr)
        if attr == Attribute.UNWRAP_TEMPLATE:
            expected = {int(k): _raw(v) for k, v in wanted.items()}
            if got is None:
                out.append(f"{_name(attr)} is absent; policy: the {len(expected)}-attribute "
                           "profile")
            elif got != expected:
                differ = sorted({*got, *expected} - {k for k in got if got[k] == expected.get(k)})
                out.append(f"{_name(attr)} differs from policy in "
                           + ", ".join(_name(a) for a in differ))
        elif attr == Attribute.ALLOWED_MECHANISMS:
            if got is None or sorted(got) != sorted(int(m) for m in wanted):
                shown = "absent (any mechanism)" if not got else _mechanisms(got)
                out.append(f"{_name(attr)} is {shown}; policy: {_mechanisms(wanted)}")
        elif got is None:
            # A usage flag the module does not report is no usage; a protection flag must show.
            if wanted is not False:
                out.append(f"{_name(attr)} is absent; policy: {str(wanted).lower()}")
        elif got != wanted:
            out.append(f"{_name(attr)} is {str(got).lower()}; policy: {str(wanted).lower()}")
    return out


def shown(found: Mapping[int, Any]) -> dict[str, str]:
    """Return read attributes as display text, by CKA_ name (a nested template by its size)."""
    out = {}
    for attr, value in found.items():
        if value is None:
            text = "absent"
        elif attr == Attribute.ALLOWED_MECHANISMS:
            text = _mechanisms(value)
        elif attr == Attribute.UNWRAP_TEMPLATE:
            text = f"{len(value)} attributes"
        else:
            text = str(value).lower()
        out[_name(attr)] = text
    return out


# --- lookup and check values ---------------------------------------------------------------------
def objects(session: Any, object_class: ObjectClass, label: str) -> list[Any]:
    """Return every object of a class with a label (under the call lock)."""
    with translated("find key", label):
        return list(session.get_objects({Attribute.CLASS: object_class,
                                         Attribute.LABEL: label}))


def find(session: Any, module_path: str, kind: Kind, label: str,
         pin: KeyPin | None = None) -> Any:
    """Return the one object naming a long-lived key, checked against its kind and pin.

    With a pin, the CKA_ID must equal the pinned one (the check value is the caller's:
    ``check_value``). Every object class of the kind (both halves of a pair) is checked.

    Raises:
        KeyNotFound: no object with the label.
        KeyPolicyError: several, another CKA_ID, or an attribute weaker than policy.
    """
    named = None
    for object_class, policy in kind.policy.items():
        found = objects(session, object_class, label)
        what = kind.name if object_class == kind.object_class else \
            f"{kind.name} ({object_class.name.lower().replace('_', ' ')})"
        if not found:
            raise KeyNotFound("find key", f"{what} missing from the token", label)
        if len(found) > 1:
            raise KeyPolicyError(what, label, f"{len(found)} objects carry this label; "
                                              "policy: exactly one")
        obj = found[0]
        if pin is not None:
            with translated("read key id", label):
                key_id = bytes(obj[Attribute.ID]).hex()
            if key_id != pin.key_id:
                raise KeyPolicyError(what, label, f"CKA_ID is {key_id}; pinned: {pin.key_id}")
        wrong = violations(policy, read_attributes(session, module_path, obj, policy))
        if wrong:
            raise KeyPolicyError(what, label, "; ".join(wrong))
        if object_class == kind.object_class:
            named = obj
    return named


def check_value(session: Any, kind: Kind, label: str, obj: Any) -> str:
    """Derive a long-lived key's check value (hex); see the module docstring.

    Raises:
        HsmError: the key refused the operation.
    """
    if kind in (STORAGE_KEK, MASTER_KEK):
        with translated("derive check value", label):
            known = session.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: CHECK_KEY, **call_template(in_flight_profile())})
            try:
                return bytes(obj.wrap_key(known, mechanism=Mechanism.AES_KEY_WRAP)).hex()
            finally:
                known.destroy()
    if kind is BLOB_MAC:
        with translated("derive check value", label):
            return bytes(obj.sign(CHECK_MESSAGE, mechanism=Mechanism.AES_CMAC)).hex()
    return hashlib.sha256(public_key_der(session, label)).hexdigest()


def public_key_der(session: Any, label: str) -> bytes:
    """Return the SubjectPublicKeyInfo (DER) of a key pair's public half (RSA or EC).

    Raises:
        KeyNotFound: no public key with this label.
    """
    with translated("read public key", label):
        pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
        if pub[Attribute.KEY_TYPE] == KeyType.RSA:
            public: Any = rsa.RSAPublicNumbers(
                int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(pub[Attribute.MODULUS], "big")).public_key()
        else:
            public = serialization.load_der_public_key(encode_ec_public_key(pub))
    return bytes(public.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo))


def new_key_id() -> bytes:
    """Return a random 16-byte CKA_ID: a look-alike must guess it before the check value."""
    return secrets.token_bytes(16)


__all__ = ["CA_ROLE_PREFIX", "CHECK_KEY", "CHECK_MESSAGE", "KeyPin", "check_value", "find",
           "forget_trust", "kind_of_role", "new_key_id", "public_key_der", "read_attributes",
           "role_labels", "trust", "trusted_pin", "violations"]
