"""What the configured module enforces (tried, not assumed), and the pins of the long-lived keys.

``probe`` tries each protection meterkeys relies on with throw-away *session* objects in a
session of its own, which it closes: every probe object ends with it, the non-destroyable ones
included, and nothing is written to the token. ``verify_pins`` re-derives each pinned key (the
pins are passed in: this package never reads the inventory) and, when all hold, makes this
process's lookups check them too (``lifecycle.hsm.keyring.trust``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px

from lifecycle.config import Settings
from lifecycle.errors import HsmError, KeyPolicyError, PermanentHsmError
from lifecycle.hsm import keyring, native
from lifecycle.hsm.boundary import CALL_LOCK
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.templates import call_template, transport_profile, usage_profile

# Mechanisms meterkeys needs: RFC 3394/5649 key wrap, RSA-OAEP import, ECDSA audit signatures,
# AES-GCM (DLMS Green Book), AES-CMAC blob binding (NIST SP 800-38B).
NEEDED_MECHANISMS = {
    "AES_KEY_WRAP": Mechanism.AES_KEY_WRAP, "AES_KEY_WRAP_PAD": Mechanism.AES_KEY_WRAP_PAD,
    "RSA_PKCS_OAEP": Mechanism.RSA_PKCS_OAEP, "ECDSA": Mechanism.ECDSA,
    "AES_GCM": Mechanism.AES_GCM, "AES_CMAC": Mechanism.AES_CMAC,
}
PROTECTIONS = {
    "modifiable_false": "CKA_MODIFIABLE=false refuses C_SetAttributeValue",
    "copyable_false": "CKA_COPYABLE=false refuses C_CopyObject",
    "destroyable_false": "CKA_DESTROYABLE=false refuses C_DestroyObject",
    "unwrap_template": "CKA_UNWRAP_TEMPLATE refuses another template",
    "allowed_mechanisms": "CKA_ALLOWED_MECHANISMS refuses other mechanisms",
    "wrap_with_trusted": "CKA_WRAP_WITH_TRUSTED refuses an untrusted wrapping key",
    "user_cannot_set_trusted": "the user cannot set CKA_TRUSTED",
    "nested_unwrap_template": "an unwrap template inside an unwrap template",
}


@dataclass
class KeyReport:
    """One long-lived key: its role, label, attributes as shown, and what is wrong (if any)."""

    role: str
    label: str
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class CheckReport:
    """What ``meterkeys hsm check`` prints; ``failed`` decides its exit status."""

    protections: dict[str, bool]
    mechanisms: dict[str, bool]
    keys: list[KeyReport]

    @property
    def failed(self) -> bool:
        """Whether a needed mechanism is missing or a long-lived key is wrong."""
        return not all(self.mechanisms.values()) or any(k.problem for k in self.keys)


def missing_mechanisms(hsm: Hsm) -> list[str]:
    """Return the names of the needed mechanisms the module does not offer."""
    offered = hsm.mechanisms()
    return [name for name, mech in NEEDED_MECHANISMS.items() if int(mech) not in offered]


def verify_pins(settings: Settings, pins: Sequence[KeyPin]) -> None:
    """Check every pinned key and the module's mechanisms; then trust the pins in this process.

    Each key must be the one object with its label, carry the pinned CKA_ID, give the pinned
    check value, and meet its kind's policy.

    Raises:
        KeyNotFound: a pinned key is missing.
        KeyPolicyError: naming the key and what differs (duplicate, CKA_ID, check value,
            an attribute weaker than policy).
        PermanentHsmError: the module lacks a mechanism meterkeys needs.
    """
    hsm = Hsm.open(settings)
    missing = missing_mechanisms(hsm)
    if missing:
        raise PermanentHsmError("mechanism check", "the module lacks " + ", ".join(missing))
    with hsm.session() as s:
        for pin in pins:
            s.check_key(pin.label, keyring.kind_of_role(pin.role), pin)
    keyring.trust(pins)


def report(settings: Settings, pins: Sequence[KeyPin]) -> CheckReport:
    """Probe the module and describe every pinned (or configured) long-lived key.

    Raises:
        HsmError: the token could not be opened.
    """
    hsm = Hsm.open(settings)
    offered = hsm.mechanisms()
    mechanisms = {name: int(mech) in offered for name, mech in NEEDED_MECHANISMS.items()}
    by_role = {pin.role: pin for pin in pins}
    roles = dict(keyring.role_labels(settings))
    roles.update({pin.role: pin.label for pin in pins})
    keys = []
    with hsm.session() as s:
        for role, label in roles.items():
            kind = keyring.kind_of_role(role)
            entry = KeyReport(role, label, s.describe_key(label, kind))
            try:
                s.check_key(label, kind, by_role.get(role))
                if role not in by_role:
                    entry.problem = "not pinned in the inventory: run meterkeys hsm init"
            except HsmError as exc:
                entry.problem = str(exc)
            keys.append(entry)
    return CheckReport(probe(hsm), mechanisms, keys)


def _refused(attempt: Callable[[], Any]) -> bool:
    try:
        attempt()
    except (px.PKCS11Error, HsmError):
        return True
    return False


class _Probe:
    """Throw-away session objects of one probe session (all end when it closes)."""

    def __init__(self, session: Any, module_path: str) -> None:
        self.session = session
        self.module = module_path

    def aes(self, **extra: Any) -> Any:
        key_id = keyring.new_key_id()
        template: dict[int, Any] = {
                    Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE_LEN: 32, Attribute.TOKEN: False, Attribute.ID: key_id,
                    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                    **{Attribute[k.upper()]: v for k, v in extra.items()}}
        native.generate_key(self.session, self.module, Mechanism.AES_KEY_GEN, template)
        return self.session.get_key(object_class=ObjectClass.SECRET_KEY, id=key_id)

    def victim(self, **extra: Any) -> Any:
        template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                    **{Attribute[k.upper()]: v for k, v in extra.items()}}
        return self.session.generate_key(KeyType.AES, 128, store=False, template=template)


def probe(hsm: Hsm) -> dict[str, bool]:
    """Try each protection on throw-away session objects; return which the module enforces.

    Raises:
        HsmError: the probe session could not be opened.
    """
    with hsm.raw_session() as session, CALL_LOCK:
        p = _Probe(session, str(hsm.settings.module_path))

        def set_decrypt(key: Any) -> None:
            key[Attribute.DECRYPT] = True

        result = {
            "modifiable_false": _refused(lambda: set_decrypt(p.aes(modifiable=False))),
            "copyable_false": _refused(lambda: p.aes(copyable=False).copy(
                {Attribute.DECRYPT: True})),
            "destroyable_false": _refused(lambda: p.aes(destroyable=False).destroy()),
        }
        wrapper = p.aes(wrap=True, unwrap=True, unwrap_template=usage_profile())
        blob = wrapper.wrap_key(p.victim(), mechanism=Mechanism.AES_KEY_WRAP)

        def unwrap(template: dict[int, Any]) -> Any:
            return wrapper.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob,
                                      mechanism=Mechanism.AES_KEY_WRAP, template=template)

        result["unwrap_template"] = not _refused(
            lambda: unwrap(call_template(usage_profile()))) and _refused(
            lambda: unwrap({Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}))
        restricted = p.aes(wrap=True, allowed_mechanisms=[Mechanism.AES_KEY_WRAP])
        result["allowed_mechanisms"] = not _refused(lambda: restricted.wrap_key(
            p.victim(), mechanism=Mechanism.AES_KEY_WRAP)) and _refused(
            lambda: restricted.wrap_key(p.victim(), mechanism=Mechanism.AES_KEY_WRAP_PAD))
        plain = p.aes(wrap=True)
        result["wrap_with_trusted"] = _refused(lambda: plain.wrap_key(
            p.victim(wrap_with_trusted=True), mechanism=Mechanism.AES_KEY_WRAP))
        result["user_cannot_set_trusted"] = _refused(lambda: p.aes(trusted=True))
        result["nested_unwrap_template"] = not _refused(lambda: p.aes(
            unwrap=True, unwrap_template={**transport_profile(),
                                          Attribute.UNWRAP_TEMPLATE: usage_profile()}))
    return result


def require_pins(settings: Settings, pins: Sequence[KeyPin]) -> None:
    """Check that every fixed role is pinned, under its configured label.

    Raises:
        KeyPolicyError: a role has no pin, or the configuration names another label.
    """
    by_role = {pin.role: pin for pin in pins}
    for role, label in keyring.role_labels(settings).items():
        kind = keyring.kind_of_role(role)
        pin = by_role.get(role)
        if pin is None:
            raise KeyPolicyError(kind.name, label, "not pinned in the inventory: run "
                                                   "meterkeys hsm init")
        if pin.label != label:
            raise KeyPolicyError(kind.name, label, f"the inventory pins label {pin.label!r}; "
                                                   "the configuration names another")


__all__ = ["NEEDED_MECHANISMS", "PROTECTIONS", "CheckReport", "KeyReport", "missing_mechanisms",
           "probe", "report", "require_pins", "verify_pins"]
