"""Key profiles: the templates of every key meterkeys makes, and the policy it checks them by.

Each long-lived key is made token, private, sensitive, non-extractable, non-modifiable,
non-copyable and non-destroyable, with the fewest usages its role needs and
``CKA_ALLOWED_MECHANISMS`` (PKCS#11 v2.40 §4.1.1). Each unwrapping key carries an unwrap template
(``CKA_UNWRAP_TEMPLATE``, PKCS#11 v2.40 §4.9.1) that forces what it unwraps; SoftHSM2 2.6.1 wants
that template repeated exactly in every ``C_UnwrapKey``. Facts behind each choice: scratch
findings of issue 10 and the shared reference "pkcs11.md" §6.

Session keys come in three profiles: *in flight* (a meter key between a vendor's transport key,
or its generation, and a storage KEK: extractable, sensitive, no usage), *usage* (GUEK, GBEK,
GAK out of storage: AES-GCM only) and *master* (the meter's master key out of storage: AES key
wrap only). Keys out of storage are never extractable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

Template = dict[int, Any]

SECRET_USAGE = (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP, Attribute.UNWRAP,
                Attribute.SIGN, Attribute.VERIFY, Attribute.DERIVE)
PRIVATE_USAGE = (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.SIGN, Attribute.SIGN_RECOVER,
                 Attribute.DERIVE)
PUBLIC_USAGE = (Attribute.ENCRYPT, Attribute.WRAP, Attribute.VERIFY, Attribute.VERIFY_RECOVER,
                Attribute.DERIVE)
# What a genuine long-lived secret or private key shows. LOCAL, ALWAYS_SENSITIVE and
# NEVER_EXTRACTABLE are set by the module alone (PKCS#11 v2.40 §4.4, §4.9): a look-alike made
# with C_CreateObject or C_UnwrapKey (a key of a known value) has LOCAL or ALWAYS_SENSITIVE false.
LONG_LIVED_PROTECTION: dict[int, bool] = {
    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False, Attribute.ALWAYS_SENSITIVE: True,
    Attribute.NEVER_EXTRACTABLE: True, Attribute.LOCAL: True, Attribute.MODIFIABLE: False,
    Attribute.COPYABLE: False, Attribute.DESTROYABLE: False,
}
PUBLIC_PROTECTION: dict[int, bool] = {
    Attribute.TOKEN: True, Attribute.MODIFIABLE: False, Attribute.COPYABLE: False,
    Attribute.DESTROYABLE: False,
}
STORAGE_KEK_BITS = 256
MAC_KEY_BITS = 256
IMPORT_KEY_BITS = 3072  # NIST SP 800-57 Part 1 Table 2: 128-bit security strength


def _flags(names: Sequence[int], *allowed: int) -> Template:
    return {flag: flag in allowed for flag in names}


def _unwrapped(*allowed: int, extractable: bool, mechanisms: Sequence[int]) -> Template:
    """What an unwrap forces on a secret session key.

    ``CKA_MODIFIABLE=False`` comes last: SoftHSM2 2.6.1 applies a C_UnwrapKey template in array
    order and refuses (CKR_ATTRIBUTE_READ_ONLY) every attribute after it.
    """
    template: Template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: extractable,
        **_flags(SECRET_USAGE, *allowed),
    }
    if mechanisms:  # an empty CKA_ALLOWED_MECHANISMS means "any mechanism" (v2.40 §4.1.1)
        template[Attribute.ALLOWED_MECHANISMS] = list(mechanisms)
    template[Attribute.COPYABLE] = False
    template[Attribute.MODIFIABLE] = False
    return template


def usage_profile() -> Template:
    """GUEK, GBEK, GAK out of storage: AES-GCM encrypt/decrypt only, never extractable.

    GCM only, so no ECB/CBC decrypt oracle can undo a key wrap (attack C/D of issue 10).
    """
    return _unwrapped(Attribute.ENCRYPT, Attribute.DECRYPT, extractable=False,
                      mechanisms=[Mechanism.AES_GCM])


def master_profile() -> Template:
    """The meter's master key out of storage: wraps new keys (RFC 3394) and nothing else."""
    return _unwrapped(Attribute.WRAP, extractable=False, mechanisms=[Mechanism.AES_KEY_WRAP])


def transport_profile() -> Template:
    """A vendor's batch transport key out of RSA-OAEP: unwraps (RFC 3394/5649) only."""
    return _unwrapped(Attribute.UNWRAP, extractable=False,
                      mechanisms=[Mechanism.AES_KEY_WRAP, Mechanism.AES_KEY_WRAP_PAD])


def in_flight_profile() -> Template:
    """A meter key on its way into storage: extractable (to be wrapped), sensitive, no usage."""
    return _unwrapped(extractable=True, mechanisms=[])


def call_template(profile: Mapping[int, Any]) -> Template:
    """Return a profile as a python-pkcs11 call template: no class or type, MODIFIABLE last.

    python-pkcs11 supplies CKA_CLASS and CKA_KEY_TYPE itself and appends the caller's other
    attributes in order, so MODIFIABLE=False stays last (SoftHSM2 order quirk, see above).
    """
    out = {k: v for k, v in profile.items()
           if k not in (Attribute.CLASS, Attribute.KEY_TYPE, Attribute.MODIFIABLE)}
    if Attribute.MODIFIABLE in profile:
        out[Attribute.MODIFIABLE] = profile[Attribute.MODIFIABLE]
    return out


def _long_lived(label: str, key_id: bytes) -> Template:
    return {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.LABEL: label,
            Attribute.ID: key_id, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False, Attribute.COPYABLE: False,
            Attribute.DESTROYABLE: False}


def _public(label: str, key_id: bytes) -> Template:
    return {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.LABEL: label,
            Attribute.ID: key_id, Attribute.MODIFIABLE: False, Attribute.COPYABLE: False,
            Attribute.DESTROYABLE: False}


@dataclass(frozen=True)
class Kind:
    """One kind of long-lived key: its name in messages and the policy its objects must meet.

    ``policy`` maps object class -> attribute -> required value: a bool, a list of mechanisms
    (CKA_ALLOWED_MECHANISMS) or a template (CKA_UNWRAP_TEMPLATE).
    """

    name: str
    policy: dict[ObjectClass, dict[int, Any]]

    @property
    def object_class(self) -> ObjectClass:
        """The class that names the key (secret, or the private half of a pair)."""
        return next(iter(self.policy))


def _secret_kind(name: str, *usage: int, mechanisms: list[int],
                 unwrap_template: Template | None = None) -> Kind:
    policy: dict[int, Any] = {**LONG_LIVED_PROTECTION, **_flags(SECRET_USAGE, *usage),
                              Attribute.ALLOWED_MECHANISMS: mechanisms}
    if unwrap_template is not None:
        policy[Attribute.UNWRAP_TEMPLATE] = unwrap_template
    return Kind(name, {ObjectClass.SECRET_KEY: policy})


STORAGE_KEK = _secret_kind("storage KEK", Attribute.WRAP, Attribute.UNWRAP,
                           mechanisms=[Mechanism.AES_KEY_WRAP], unwrap_template=usage_profile())
MASTER_KEK = _secret_kind("master KEK", Attribute.WRAP, Attribute.UNWRAP,
                          mechanisms=[Mechanism.AES_KEY_WRAP], unwrap_template=master_profile())
BLOB_MAC = _secret_kind("blob MAC key", Attribute.SIGN, Attribute.VERIFY,
                        mechanisms=[Mechanism.AES_CMAC])
AUDIT_KEY = Kind("audit key", {
    ObjectClass.PRIVATE_KEY: {**LONG_LIVED_PROTECTION, **_flags(PRIVATE_USAGE, Attribute.SIGN),
                              Attribute.ALLOWED_MECHANISMS: [Mechanism.ECDSA]},
    ObjectClass.PUBLIC_KEY: {**PUBLIC_PROTECTION, **_flags(PUBLIC_USAGE, Attribute.VERIFY)},
})
# A CA's signing key (lifecycle.pki): the audit key's profile under its own name, so a CA key
# and the audit key are never taken one for the other. ECDSA over a digest hashed outside.
CA_KEY = Kind("CA key", {
    ObjectClass.PRIVATE_KEY: {**LONG_LIVED_PROTECTION, **_flags(PRIVATE_USAGE, Attribute.SIGN),
                              Attribute.ALLOWED_MECHANISMS: [Mechanism.ECDSA]},
    ObjectClass.PUBLIC_KEY: {**PUBLIC_PROTECTION, **_flags(PUBLIC_USAGE, Attribute.VERIFY)},
})
IMPORT_KEY = Kind("import key", {
    ObjectClass.PRIVATE_KEY: {**LONG_LIVED_PROTECTION, **_flags(PRIVATE_USAGE, Attribute.UNWRAP),
                              Attribute.ALLOWED_MECHANISMS: [Mechanism.RSA_PKCS_OAEP],
                              Attribute.UNWRAP_TEMPLATE: transport_profile()},
    # No usage at all: meterkeys encrypts its OAEP probe in software, vendors get the PEM.
    ObjectClass.PUBLIC_KEY: {**PUBLIC_PROTECTION, **_flags(PUBLIC_USAGE)},
})


def secret_template(kind: Kind, label: str, key_id: bytes, bits: int) -> Template:
    """The C_GenerateKey template of a long-lived AES key of ``kind`` (KEK or MAC key)."""
    policy = kind.policy[ObjectClass.SECRET_KEY]
    template: Template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE_LEN: bits // 8, **_long_lived(label, key_id),
        **{flag: policy[flag] for flag in SECRET_USAGE},
        Attribute.ALLOWED_MECHANISMS: policy[Attribute.ALLOWED_MECHANISMS],
    }
    if Attribute.UNWRAP_TEMPLATE in policy:
        template[Attribute.UNWRAP_TEMPLATE] = policy[Attribute.UNWRAP_TEMPLATE]
    return template


def pair_templates(kind: Kind, label: str, key_id: bytes,
                   params: Mapping[int, Any]) -> tuple[Template, Template]:
    """(public, private) C_GenerateKeyPair templates of a key pair of ``kind``.

    ``params`` holds the algorithm's attributes of the public half (modulus bits and exponent,
    or EC parameters).
    """
    private_policy = kind.policy[ObjectClass.PRIVATE_KEY]
    public_policy = kind.policy[ObjectClass.PUBLIC_KEY]
    public: Template = {**_public(label, key_id), **dict(params),
                        **{flag: public_policy[flag] for flag in PUBLIC_USAGE}}
    private: Template = {**_long_lived(label, key_id),
                         **{flag: private_policy[flag] for flag in PRIVATE_USAGE},
                         Attribute.ALLOWED_MECHANISMS: private_policy[Attribute.ALLOWED_MECHANISMS]}
    if Attribute.UNWRAP_TEMPLATE in private_policy:
        private[Attribute.UNWRAP_TEMPLATE] = private_policy[Attribute.UNWRAP_TEMPLATE]
    return public, private


__all__ = ["AUDIT_KEY", "BLOB_MAC", "CA_KEY", "IMPORT_KEY", "MASTER_KEK", "STORAGE_KEK", "Kind",
           "call_template", "in_flight_profile", "master_profile", "pair_templates",
           "secret_template", "transport_profile", "usage_profile"]
