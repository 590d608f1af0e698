"""One PKCS#11 session: long-lived keys (checked and pinned), session keys by handle, and use.

The session hands out key *references* (labels, ``SessionKey`` handles scoped to a session) and
public bytes, never secret key material. Every call holds the process-wide call lock
(``lifecycle.hsm.boundary``).
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px
from pkcs11.util.ec import encode_ecdsa_signature, encode_named_curve_parameters

from lifecycle.config import Settings
from lifecycle.errors import HsmError, IntegrityError, KeyPolicyError, PermanentHsmError
from lifecycle.hsm import keyring, native
from lifecycle.hsm.boundary import UNWRAP_FAILED, translated
from lifecycle.hsm.keyring import IMPORT_ROLE_PREFIX, KeyPin
from lifecycle.hsm.templates import (
    AUDIT_KEY,
    BLOB_MAC,
    CA_KEY,
    IMPORT_KEY,
    IMPORT_KEY_BITS,
    MAC_KEY_BITS,
    MASTER_KEK,
    STORAGE_KEK,
    STORAGE_KEK_BITS,
    Kind,
    call_template,
    in_flight_profile,
    pair_templates,
    secret_template,
    transport_profile,
)
from lifecycle.policy import OAEP_HASHES

CURVES = {"P-256": "secp256r1", "P-384": "secp384r1"}
# OAEP hash name (lifecycle.policy.OAEP_HASHES) -> (PKCS#11 hash mechanism, MGF1).
OAEP_MECHANISMS = {"sha256": (Mechanism.SHA256, pkcs11.MGF.SHA256),
                   "sha1": (Mechanism.SHA_1, pkcs11.MGF.SHA1)}


class _Made:
    # Session objects made by this process's sessions: SoftHSM2 2.6.1 keeps the memory of each
    # one until C_Finalize, so the HSM workers are replaced by this count (``lifecycle.hsm.pool``).
    count = 0


def objects_made() -> int:
    """Return how many session objects (keys generated or unwrapped in flight) the HSM
    sessions of this process have made so far."""
    return _Made.count


@dataclass
class SessionKey:
    """A secret key that exists only as a session object of one HSM session.

    It carries a handle, never key bytes. Destroy it with ``HsmSession.destroy`` or use it
    through a context manager of ``HsmSession``.
    """

    _key: Any = field(repr=False)
    bits: int
    destroyed: bool = False


class HsmSession:
    """One PKCS#11 session; every method holds the process-wide call lock.

    Long-lived keys are looked up through ``lifecycle.hsm.keyring``: exactly one object with the
    label, every attribute its kind's policy requires, and the pinned CKA_ID and check value once
    this process has verified the inventory's pins. A key passes once per session (cached).
    """

    def __init__(self, session: Any, settings: Settings) -> None:
        self._session = session
        self._settings = settings
        self._module = str(settings.module_path)
        self._keys: dict[tuple[str, str], Any] = {}

    def close(self) -> None:
        """Close the PKCS#11 session (its session objects end with it)."""
        with translated("close session"):
            self._session.close()

    # --- lookup --------------------------------------------------------------------------------
    def _long_lived(self, label: str, kind: Kind) -> Any:
        cached = self._keys.get((label, kind.name))
        if cached is not None:
            return cached
        pin = keyring.trusted_pin(label)
        key = keyring.find(self._session, self._module, kind, label, pin)
        if pin is not None:
            value = keyring.check_value(self._session, kind, label, key)
            if value != pin.check_value:
                raise KeyPolicyError(kind.name, label, "check value differs from the pin: "
                                     "another key under the pinned label and CKA_ID")
        self._keys[(label, kind.name)] = key
        return key

    def _kek_kind(self, label: str) -> Kind:
        if label == self._settings.storage_kek_label:
            return STORAGE_KEK
        if label == self._settings.master_kek_label:
            return MASTER_KEK
        pin = keyring.trusted_pin(label)
        if pin is not None and keyring.kind_of_role(pin.role) in (STORAGE_KEK, MASTER_KEK):
            return keyring.kind_of_role(pin.role)
        raise KeyPolicyError("storage KEK", label, "not a configured storage KEK label")

    def _kek(self, label: str) -> tuple[Any, Kind]:
        kind = self._kek_kind(label)
        return self._long_lived(label, kind), kind

    def has_key(self, label: str, object_class: ObjectClass = ObjectClass.SECRET_KEY) -> bool:
        """Return whether any token object with this label and class exists (no trust implied)."""
        return bool(keyring.objects(self._session, object_class, label))

    def check_key(self, label: str, kind: Kind, pin: KeyPin | None = None) -> str:
        """Check a long-lived key against its kind's policy (and a pin); return its check value.

        Raises:
            KeyNotFound: no such key.
            KeyPolicyError: duplicated, another CKA_ID or check value, or weaker than policy.
        """
        key = keyring.find(self._session, self._module, kind, label, pin)
        value = keyring.check_value(self._session, kind, label, key)
        if pin is not None and value != pin.check_value:
            raise KeyPolicyError(kind.name, label, f"check value {value[:16]}... differs from "
                                 f"the pinned {pin.check_value[:16]}...")
        return value

    def key_id(self, label: str, kind: Kind) -> str:
        """Return the CKA_ID (hex) of the one object naming a long-lived key.

        Raises:
            KeyNotFound / KeyPolicyError: as ``check_key``.
        """
        key = keyring.find(self._session, self._module, kind, label)
        with translated("read key id", label):
            return bytes(key[Attribute.ID]).hex()

    def describe_key(self, label: str, kind: Kind) -> dict[str, dict[str, str]]:
        """Return the policy attributes of every object of a long-lived key, as shown values.

        Raises:
            HsmError: the attributes could not be read.
        """
        out: dict[str, dict[str, str]] = {}
        for object_class, policy in kind.policy.items():
            for obj in keyring.objects(self._session, object_class, label):
                found = keyring.read_attributes(self._session, self._module, obj, policy)
                shown = {name: value for name, value in keyring.shown(found).items()}
                with translated("read key id", label):
                    shown["CKA_ID"] = bytes(obj[Attribute.ID]).hex()
                out[f"{object_class.name.lower()} {len(out) + 1}"] = shown
        return out

    def key_attributes(self, label: str) -> dict[str, bool]:
        """Return the protection attributes of a secret token key (never its value).

        Raises:
            KeyNotFound: no such key.
        """
        key, _kind = self._kek(label)
        with translated("read attributes", label):
            return {
                "token": bool(key[Attribute.TOKEN]),
                "sensitive": bool(key[Attribute.SENSITIVE]),
                "extractable": bool(key[Attribute.EXTRACTABLE]),
            }

    def destroy_token_key(self, label: str, object_class: ObjectClass) -> None:
        """Destroy a token object by label; long-lived keys refuse (CKA_DESTROYABLE false).

        Raises:
            KeyNotFound: no such key.
            PermanentHsmError: the key may not be destroyed (CKR_ACTION_PROHIBITED).
        """
        with translated("destroy", label):
            key = self._session.get_key(object_class=object_class, label=label)
            key.destroy()
        self._keys = {k: v for k, v in self._keys.items() if k[0] != label}

    # --- long-lived token keys -----------------------------------------------------------------
    def _generate_secret(self, kind: Kind, role: str, label: str, bits: int) -> KeyPin:
        key_id = keyring.new_key_id()
        native.generate_key(self._session, self._module, Mechanism.AES_KEY_GEN,
                            secret_template(kind, label, key_id, bits), label)
        return self._pin_new(kind, role, label, key_id)

    def _generate_pair(self, kind: Kind, role: str, label: str, mechanism: int,
                       params: dict[int, Any]) -> KeyPin:
        key_id = keyring.new_key_id()
        public, private = pair_templates(kind, label, key_id, params)
        native.generate_key_pair(self._session, self._module, mechanism, public, private, label)
        return self._pin_new(kind, role, label, key_id)

    def _pin_new(self, kind: Kind, role: str, label: str, key_id: bytes) -> KeyPin:
        # The new key must be the one object under its label (no look-alike made beforehand).
        value = self.check_key(label, kind)
        if self.key_id(label, kind) != key_id.hex():
            raise KeyPolicyError(kind.name, label, "another object took the label")
        return KeyPin(role, label, key_id.hex(), value)

    def generate_storage_kek(self, label: str, *, master: bool = False) -> KeyPin:
        """Generate a storage KEK (AES-256, WRAP+UNWRAP, RFC 3394 only, its unwrap template).

        ``master`` makes the KEK of the meters' master keys (unwrap template: master profile).
        Returns the pin to record.

        Raises:
            HsmError: generation failed.
        """
        kind, role = (MASTER_KEK, "storage-kek-master") if master else (STORAGE_KEK,
                                                                       "storage-kek")
        return self._generate_secret(kind, role, label, STORAGE_KEK_BITS)

    def generate_mac_key(self, label: str) -> KeyPin:
        """Generate the blob MAC key (AES-256, SIGN+VERIFY with AES-CMAC only); return its pin.

        Raises:
            HsmError: generation failed.
        """
        return self._generate_secret(BLOB_MAC, "blob-mac", label, MAC_KEY_BITS)

    def generate_token_ec(self, label: str, curve: str) -> KeyPin:
        """Generate the audit EC key pair: private SIGN (ECDSA) only; return its pin.

        Raises:
            HsmError: generation failed.
        """
        if curve not in CURVES:
            raise PermanentHsmError("generate EC key", f"unsupported curve {curve}", label)
        params: dict[int, Any] = {Attribute.KEY_TYPE: KeyType.EC,
                  Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES[curve])}
        return self._generate_pair(AUDIT_KEY, "audit-signing", label, Mechanism.EC_KEY_PAIR_GEN,
                                   params)

    def generate_ca_key(self, label: str, curve: str, role: str) -> KeyPin:
        """Generate a CA's EC key pair (``CA_KEY``: private SIGN with CKM_ECDSA only, never
        extractable, modifiable, copyable or destroyable); return its pin under ``role``.

        Raises:
            PermanentHsmError: an unsupported curve, or generation failed.
            KeyPolicyError: another object took the label.
        """
        if curve not in CURVES:
            raise PermanentHsmError("generate CA key", f"unsupported curve {curve}", label)
        params: dict[int, Any] = {Attribute.KEY_TYPE: KeyType.EC,
                                  Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES[curve])}
        return self._generate_pair(CA_KEY, role, label, Mechanism.EC_KEY_PAIR_GEN, params)

    def sign_digests(self, label: str, digests: Sequence[bytes]) -> list[bytes]:
        """Sign digests with a CA key (CKM_ECDSA); return each raw signature (r || s).

        The key is checked against ``CA_KEY`` (and its pin, once trusted) before the first use
        in this session; the whole list is signed under one lock hold.

        Raises:
            KeyNotFound: no CA key with this label.
            KeyPolicyError: the key is weaker than policy or not the pinned one.
        """
        private = self._long_lived(label, CA_KEY)
        with translated("ECDSA sign", label):
            return [bytes(private.sign(digest, mechanism=Mechanism.ECDSA)) for digest in digests]

    def generate_token_rsa(self, label: str, bits: int = IMPORT_KEY_BITS, *,
                           role: str | None = None) -> KeyPin:
        """Generate an RSA import key pair: private UNWRAP (RSA-OAEP) only, forcing the transport
        profile on what it unwraps; public half with no usage. Return its pin (``role``
        defaults to ``import:<label>``; the factory import pins ``import:<vendor>``).

        Raises:
            HsmError: generation failed.
        """
        params: dict[int, Any] = {Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS_BITS: bits,
                  Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"}
        return self._generate_pair(IMPORT_KEY, role or f"{IMPORT_ROLE_PREFIX}{label}", label,
                                   Mechanism.RSA_PKCS_KEY_PAIR_GEN, params)

    def public_key_pem(self, label: str) -> bytes:
        """Return the SubjectPublicKeyInfo PEM of a token key pair (RSA or EC).

        Raises:
            KeyNotFound: no public key with this label.
        """
        der = keyring.public_key_der(self._session, label)
        public = serialization.load_der_public_key(der)
        return bytes(public.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))

    # --- session keys --------------------------------------------------------------------------
    def destroy(self, key: SessionKey) -> None:
        """Destroy a session key; destroying twice is harmless."""
        if key.destroyed:
            return
        with translated("destroy session key"):
            key._key.destroy()
        key.destroyed = True

    @contextlib.contextmanager
    def scoped(self, key: SessionKey) -> Iterator[SessionKey]:
        """Yield the key and destroy it on leaving, whatever happens."""
        try:
            yield key
        finally:
            with contextlib.suppress(HsmError):
                self.destroy(key)

    def generate_session_aes(self, bits: int) -> SessionKey:
        """Generate an in-flight AES session key: sensitive, extractable, no usage.

        It can only be wrapped (under a storage KEK, or a meter's master key): pkcs11.md §5.

        Raises:
            HsmError: generation failed.
        """
        with translated("generate session key"):
            key = self._session.generate_key(KeyType.AES, bits, store=False,
                                             template=call_template(in_flight_profile()))
        _Made.count += 1
        return SessionKey(key, bits)

    def unwrap_rsa_oaep(self, label: str, wrapped: bytes, *, oaep_hash: str = "sha256",
                        bits: int = 256) -> SessionKey:
        """Unwrap a batch transport key (RSA-OAEP, MGF1 with the same hash) under an import key.

        The result has the transport profile the import key forces: a non-extractable session
        key allowed only to unwrap (RFC 3394/5649). SoftHSM2 2.6.1 implements OAEP with SHA-1
        only (it answers CKR_ARGUMENTS_BAD to SHA-256), so the hash is chosen per vendor by
        ``probe_oaep_hash`` when the import key is made.

        Raises:
            IntegrityError: the wrapped key does not decrypt under this key pair.
            PermanentHsmError: the module does not support OAEP with this hash.
            KeyNotFound: no private key with this label.
            KeyPolicyError: the import key is weaker than policy or not the pinned one.
        """
        if oaep_hash not in OAEP_MECHANISMS:
            raise PermanentHsmError("RSA-OAEP unwrap", f"unsupported OAEP hash {oaep_hash}", label)
        mech_hash, mgf = OAEP_MECHANISMS[oaep_hash]
        private = self._long_lived(label, IMPORT_KEY)
        with translated("RSA-OAEP unwrap", label):
            try:
                key = private.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(mech_hash, mgf, None),
                    template=call_template(transport_profile()))
            except px.GeneralError as exc:
                # SoftHSM2 reports an OAEP decoding failure (wrong key, tampering) this way.
                raise px.EncryptedDataInvalid() from exc
            _Made.count += 1
            # CKA_VALUE_LEN is checked where the module reports it; SoftHSM2 reports 0.
            length = int(key[Attribute.VALUE_LEN] or 0)
        if length and length * 8 != bits:
            self.destroy(SessionKey(key, bits))
            raise IntegrityError("RSA-OAEP unwrap", f"transport key is not AES-{bits}", label)
        return SessionKey(key, bits)

    def probe_oaep_hash(self, label: str, public_pem: bytes) -> str:
        """Return the strongest OAEP hash the module can unwrap with this import key pair.

        A random throw-away AES key is encrypted in software under the public key and unwrapped
        in the HSM; the session key is destroyed at once.

        Raises:
            PermanentHsmError: the module supports none of the OAEP hashes.
        """
        public = serialization.load_pem_public_key(public_pem)
        assert isinstance(public, rsa.RSAPublicKey)
        for name, hash_class in OAEP_HASHES.items():
            algorithm = hash_class()
            probe = public.encrypt(secrets.token_bytes(32), padding.OAEP(
                mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None))
            try:
                self.destroy(self.unwrap_rsa_oaep(label, probe, oaep_hash=name))
            except PermanentHsmError as exc:
                if exc.cause != "ArgumentsBad":
                    raise
                continue
            return name
        raise PermanentHsmError("RSA-OAEP probe", "no supported OAEP hash", label)

    def unwrap_stored(self, kek_label: str, blob: bytes) -> SessionKey:
        """Unwrap a stored key with the exact unwrap template of its storage KEK.

        Under the storage KEK the key comes out for AES-GCM only, under the master KEK for AES
        key wrap only; never extractable.

        Raises:
            IntegrityError: the RFC 3394 integrity check failed (tampering, wrong KEK).
            KeyPolicyError: the KEK is not the pinned one or is weaker than policy.
        """
        kek, kind = self._kek(kek_label)
        template = call_template(kind.policy[ObjectClass.SECRET_KEY][Attribute.UNWRAP_TEMPLATE])
        with translated("AES key unwrap", kek_label):
            try:
                key = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob,
                                     mechanism=Mechanism.AES_KEY_WRAP, template=template)
            except UNWRAP_FAILED as exc:
                raise px.WrappedKeyInvalid() from exc
        _Made.count += 1
        return SessionKey(key, (len(blob) - 8) * 8)

    def unwrap_aes(self, wrapping: SessionKey | str, wrapped: bytes, *,
                   pad: bool = False) -> SessionKey:
        """Unwrap an AES key (RFC 3394, or RFC 5649 with ``pad``) into a session key.

        Under a storage KEK label this is ``unwrap_stored``; under a session key (a transport
        key) the result is in flight: sensitive, extractable, no usage.

        Raises:
            IntegrityError: the integrity check of the key wrap failed.
        """
        if isinstance(wrapping, str):
            if pad:
                raise PermanentHsmError("AES key unwrap", "storage KEKs use RFC 3394 only",
                                        wrapping)
            return self.unwrap_stored(wrapping, wrapped)
        mechanism = Mechanism.AES_KEY_WRAP_PAD if pad else Mechanism.AES_KEY_WRAP
        with translated("AES key unwrap"):
            try:
                key = wrapping._key.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                                               mechanism=mechanism,
                                               template=call_template(in_flight_profile()))
            except UNWRAP_FAILED as exc:
                raise px.WrappedKeyInvalid() from exc
        _Made.count += 1
        return SessionKey(key, (len(wrapped) - 8) * 8)

    def wrap_aes(self, wrapping: SessionKey | str, key: SessionKey, *, pad: bool = False) -> bytes:
        """Wrap an in-flight session key under a storage KEK (RFC 3394) or a session key.

        Raises:
            HsmError: the key may not be wrapped or the KEK may not wrap.
        """
        mechanism = Mechanism.AES_KEY_WRAP_PAD if pad else Mechanism.AES_KEY_WRAP
        if isinstance(wrapping, str):
            kek, _kind = self._kek(wrapping)
            label: str | None = wrapping
        else:
            kek, label = wrapping._key, None
        with translated("AES key wrap", label):
            return bytes(kek.wrap_key(key._key, mechanism=mechanism))

    def rewrap(self, source: SessionKey, wrapped: Sequence[bytes],
               targets: Sequence[str]) -> list[bytes | None]:
        """Re-wrap keys from a transport key to storage KEKs, one lock hold for the whole list.

        ``targets[i]`` is the label of the storage KEK that ``wrapped[i]`` goes under (the
        storage KEK for GUEK/GBEK/GAK, the master KEK for the master key:
        ``lifecycle.policy.storage_kek_role``). Each key is unwrapped (RFC 3394 integrity check)
        into an in-flight session object, wrapped and destroyed. An entry whose check fails
        comes back as ``None``.

        Raises:
            KeyPolicyError: a target KEK is not the pinned one or is weaker than policy.
            TransientHsmError / PermanentHsmError: the HSM failed as a whole.
        """
        if len(targets) != len(wrapped):
            raise PermanentHsmError("re-wrap", f"{len(wrapped)} keys but {len(targets)} "
                                               "target KEKs")
        keks = {label: self._kek(label)[0] for label in set(targets)}
        template = call_template(in_flight_profile())
        out: list[bytes | None] = []
        with translated("re-wrap"):
            for blob, label in zip(wrapped, targets, strict=True):
                try:
                    key = source._key.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob,
                                                 mechanism=Mechanism.AES_KEY_WRAP,
                                                 template=template)
                except UNWRAP_FAILED:
                    out.append(None)
                    continue
                _Made.count += 1
                try:
                    out.append(bytes(keks[label].wrap_key(key,
                                                          mechanism=Mechanism.AES_KEY_WRAP)))
                finally:
                    key.destroy()
        return out

    def mac(self, label: str, messages: Sequence[bytes]) -> list[bytes]:
        """Return the AES-CMAC (NIST SP 800-38B, 16-byte tag) of each message under the MAC key.

        One lock hold for the whole list.

        Raises:
            KeyPolicyError: the MAC key is not the pinned one or is weaker than policy.
            HsmError: the HSM failed.
        """
        key = self._long_lived(label, BLOB_MAC)
        with translated("MAC", label):
            return [bytes(key.sign(message, mechanism=Mechanism.AES_CMAC))
                    for message in messages]

    def verify_mac(self, label: str, messages: Sequence[bytes],
                   tags: Sequence[bytes]) -> list[bool]:
        """Return, per message, whether its tag is the AES-CMAC of it under the MAC key.

        The tag is recomputed in the HSM and compared in constant time.

        Raises:
            KeyPolicyError: the MAC key is not the pinned one or is weaker than policy.
            PermanentHsmError: messages and tags differ in number.
        """
        if len(messages) != len(tags):
            raise PermanentHsmError("MAC verify", f"{len(messages)} messages but "
                                                  f"{len(tags)} tags", label)
        return [hmac.compare_digest(expected, bytes(tag))
                for expected, tag in zip(self.mac(label, messages), tags, strict=True)]

    def sign_ecdsa(self, label: str, digest: bytes) -> bytes:
        """Sign a digest with a token EC key; return the DER (X9.62) signature.

        Raises:
            KeyNotFound: no private key with this label.
            KeyPolicyError: the key is weaker than policy or not the pinned one.
        """
        private = self._long_lived(label, AUDIT_KEY)
        with translated("ECDSA sign", label):
            raw = private.sign(digest, mechanism=Mechanism.ECDSA)
        return bytes(encode_ecdsa_signature(raw))

    def gcm_encrypt(self, key: SessionKey, iv: bytes, aad: bytes, plaintext: bytes,
                    tag_bits: int = 96) -> bytes:
        """AES-GCM encrypt with a session key; return ciphertext || tag.

        Raises:
            HsmError: the operation failed.
        """
        with translated("GCM encrypt"):
            return bytes(key._key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                          mechanism_param=pkcs11.GCMParams(iv, aad, tag_bits)))

    def gcm_decrypt(self, key: SessionKey, iv: bytes, aad: bytes, data: bytes,
                    tag_bits: int = 96) -> bytes:
        """AES-GCM decrypt and authenticate ciphertext || tag.

        Raises:
            IntegrityError: the tag does not verify.
        """
        with translated("GCM decrypt"):
            try:
                return bytes(key._key.decrypt(data, mechanism=Mechanism.AES_GCM,
                                              mechanism_param=pkcs11.GCMParams(iv, aad, tag_bits)))
            except px.GeneralError as exc:
                # SoftHSM2 answers a tag that does not verify with CKR_GENERAL_ERROR.
                raise px.EncryptedDataInvalid() from exc


__all__ = ["CURVES", "HsmSession", "KeyPin", "ObjectClass", "SessionKey"]
