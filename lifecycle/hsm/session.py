"""One PKCS#11 session: long-lived keys by label, session keys by handle, and what they do.

The session hands out key *references* (labels, ``SessionKey`` handles scoped to a session) and
public bytes, never secret key material. Every call holds the process-wide call lock
(``lifecycle.hsm.boundary``).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from lifecycle.config import Settings
from lifecycle.errors import HsmError, IntegrityError, KeyNotFound, PermanentHsmError
from lifecycle.hsm.boundary import UNWRAP_FAILED, translated
from lifecycle.policy import OAEP_HASHES

CURVES = {"P-256": "secp256r1", "P-384": "secp384r1"}
# OAEP hash name (lifecycle.policy.OAEP_HASHES) -> (PKCS#11 hash mechanism, MGF1).
OAEP_MECHANISMS = {"sha256": (Mechanism.SHA256, pkcs11.MGF.SHA256),
                   "sha1": (Mechanism.SHA_1, pkcs11.MGF.SHA1)}


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
    """One PKCS#11 session; every method holds the process-wide call lock."""

    def __init__(self, session: Any, settings: Settings) -> None:
        self._session = session
        self._settings = settings
        self._keys: dict[tuple[str, ObjectClass], Any] = {}

    def close(self) -> None:
        """Close the PKCS#11 session (its session objects end with it)."""
        with translated("close session"):
            self._session.close()

    # --- lookup --------------------------------------------------------------------------------
    def _find(self, label: str, object_class: ObjectClass = ObjectClass.SECRET_KEY) -> Any:
        cached = self._keys.get((label, object_class))
        if cached is not None:
            return cached
        with translated("find key", label):
            key = self._session.get_key(object_class=object_class, label=label)
        self._keys[(label, object_class)] = key
        return key

    def has_key(self, label: str, object_class: ObjectClass = ObjectClass.SECRET_KEY) -> bool:
        """Return whether a token object with this label and class exists."""
        try:
            self._find(label, object_class)
        except KeyNotFound:
            return False
        return True

    def key_attributes(self, label: str) -> dict[str, bool]:
        """Return the protection attributes of a secret token key (never its value).

        Raises:
            KeyNotFound: no such key.
        """
        key = self._find(label)
        with translated("read attributes", label):
            return {
                "token": bool(key[Attribute.TOKEN]),
                "sensitive": bool(key[Attribute.SENSITIVE]),
                "extractable": bool(key[Attribute.EXTRACTABLE]),
            }

    def destroy_token_key(self, label: str, object_class: ObjectClass) -> None:
        """Destroy a token object by label (used for retiring long-lived keys).

        Raises:
            KeyNotFound: no such key.
        """
        key = self._find(label, object_class)
        with translated("destroy", label):
            key.destroy()
        self._keys.pop((label, object_class), None)

    # --- long-lived token keys -----------------------------------------------------------------
    def generate_token_aes(self, label: str, bits: int, *, derive: bool = False) -> None:
        """Generate a sensitive, non-extractable AES token key for wrapping (or derivation).

        Raises:
            HsmError: generation failed.
        """
        template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.WRAP: not derive,
            Attribute.UNWRAP: not derive,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
            Attribute.DERIVE: derive,
        }
        with translated("generate AES key", label):
            self._session.generate_key(KeyType.AES, bits, label=label, store=True,
                                       template=template)

    def generate_token_ec(self, label: str, curve: str) -> None:
        """Generate an EC signing key pair on the token; the private half never leaves it.

        Raises:
            HsmError: generation failed.
        """
        if curve not in CURVES:
            raise PermanentHsmError("generate EC key", f"unsupported curve {curve}", label)
        with translated("generate EC key", label):
            params = self._session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES[curve])},
                local=True)
            params.generate_keypair(
                store=True, label=label,
                public_template={Attribute.TOKEN: True, Attribute.VERIFY: True},
                private_template={Attribute.TOKEN: True, Attribute.SENSITIVE: True,
                                  Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                                  Attribute.PRIVATE: True})

    def generate_token_rsa(self, label: str, bits: int = 3072) -> None:
        """Generate an RSA key-import pair: the private half may only unwrap, never leave.

        Raises:
            HsmError: generation failed.
        """
        with translated("generate RSA key", label):
            self._session.generate_keypair(
                KeyType.RSA, bits, store=True, label=label,
                public_template={Attribute.TOKEN: True, Attribute.WRAP: True,
                                 Attribute.ENCRYPT: True, Attribute.VERIFY: False},
                private_template={Attribute.TOKEN: True, Attribute.SENSITIVE: True,
                                  Attribute.EXTRACTABLE: False, Attribute.UNWRAP: True,
                                  Attribute.DECRYPT: False, Attribute.SIGN: False,
                                  Attribute.PRIVATE: True})

    def public_key_pem(self, label: str) -> bytes:
        """Return the SubjectPublicKeyInfo PEM of a token key pair (RSA or EC).

        Raises:
            KeyNotFound: no public key with this label.
        """
        pub = self._find(label, ObjectClass.PUBLIC_KEY)
        with translated("read public key", label):
            key_type = pub[Attribute.KEY_TYPE]
            if key_type == KeyType.RSA:
                numbers = rsa.RSAPublicNumbers(
                    int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                    int.from_bytes(pub[Attribute.MODULUS], "big"))
                public: Any = numbers.public_key()
            else:
                public = serialization.load_der_public_key(encode_ec_public_key(pub))
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
        """Generate an extractable (wrappable), sensitive AES session key.

        Raises:
            HsmError: generation failed.
        """
        with translated("generate session key"):
            key = self._session.generate_key(KeyType.AES, bits, store=False,
                                             template=_session_template())
        return SessionKey(key, bits)

    def unwrap_rsa_oaep(self, label: str, wrapped: bytes, *, oaep_hash: str = "sha256",
                        bits: int = 256) -> SessionKey:
        """Unwrap an AES key wrapped with RSA-OAEP (MGF1 with the same hash) under a token key.

        The result is a non-extractable session key allowed only to unwrap. SoftHSM2 2.6.1
        implements OAEP with SHA-1 only (it answers CKR_ARGUMENTS_BAD to SHA-256), so the hash is
        chosen per vendor by ``probe_oaep_hash`` when the import key is made.

        Raises:
            IntegrityError: the wrapped key does not decrypt under this key pair.
            PermanentHsmError: the module does not support OAEP with this hash.
            KeyNotFound: no private key with this label.
        """
        if oaep_hash not in OAEP_MECHANISMS:
            raise PermanentHsmError("RSA-OAEP unwrap", f"unsupported OAEP hash {oaep_hash}", label)
        mech_hash, mgf = OAEP_MECHANISMS[oaep_hash]
        private = self._find(label, ObjectClass.PRIVATE_KEY)
        with translated("RSA-OAEP unwrap", label):
            try:
                key = private.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(mech_hash, mgf, None),
                    template={Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                              Attribute.EXTRACTABLE: False, Attribute.UNWRAP: True,
                              Attribute.WRAP: False, Attribute.ENCRYPT: False,
                              Attribute.DECRYPT: False})
            except px.GeneralError as exc:
                # SoftHSM2 reports an OAEP decoding failure (wrong key, tampering) this way.
                raise px.EncryptedDataInvalid() from exc
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

    def unwrap_aes(self, wrapping: SessionKey | str, wrapped: bytes, *,
                   pad: bool = False) -> SessionKey:
        """Unwrap an AES key (RFC 3394, or RFC 5649 with ``pad``) into a session key.

        Raises:
            IntegrityError: the integrity check of the key wrap failed.
        """
        kek, label = self._wrapping(wrapping)
        mechanism = Mechanism.AES_KEY_WRAP_PAD if pad else Mechanism.AES_KEY_WRAP
        with translated("AES key unwrap", label):
            try:
                key = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                                     mechanism=mechanism, template=_session_template())
            except UNWRAP_FAILED as exc:
                raise px.WrappedKeyInvalid() from exc
        return SessionKey(key, (len(wrapped) - 8) * 8)

    def wrap_aes(self, wrapping: SessionKey | str, key: SessionKey, *, pad: bool = False) -> bytes:
        """Wrap a session key under a KEK (RFC 3394, or RFC 5649 with ``pad``).

        Raises:
            HsmError: the key may not be wrapped or the KEK may not wrap.
        """
        kek, label = self._wrapping(wrapping)
        mechanism = Mechanism.AES_KEY_WRAP_PAD if pad else Mechanism.AES_KEY_WRAP
        with translated("AES key wrap", label):
            return bytes(kek.wrap_key(key._key, mechanism=mechanism))

    def rewrap(self, wrapping: SessionKey | str, wrapped: Sequence[bytes],
               kek_label: str) -> list[bytes | None]:
        """Re-wrap keys from one KEK to a token KEK, one lock hold for the whole list.

        Each key is unwrapped (RFC 3394 integrity check) into a session object, wrapped under
        ``kek_label`` and destroyed. An entry whose check fails comes back as ``None``.

        Raises:
            TransientHsmError / PermanentHsmError: the HSM failed as a whole.
        """
        source, label = self._wrapping(wrapping)
        target = self._find(kek_label)
        template = _session_template()
        out: list[bytes | None] = []
        with translated("re-wrap", label):
            for blob in wrapped:
                try:
                    key = source.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob,
                                            mechanism=Mechanism.AES_KEY_WRAP, template=template)
                except UNWRAP_FAILED:
                    out.append(None)
                    continue
                try:
                    out.append(bytes(target.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP)))
                finally:
                    key.destroy()
        return out

    def sign_ecdsa(self, label: str, digest: bytes) -> bytes:
        """Sign a digest with a token EC key; return the DER (X9.62) signature.

        Raises:
            KeyNotFound: no private key with this label.
        """
        private = self._find(label, ObjectClass.PRIVATE_KEY)
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

    def _wrapping(self, wrapping: SessionKey | str) -> tuple[Any, str | None]:
        if isinstance(wrapping, SessionKey):
            return wrapping._key, None
        return self._find(wrapping), wrapping


def _session_template() -> dict[Attribute, Any]:
    # Meter keys must be wrappable on their way to a blob (reference pkcs11.md §5), yet stay
    # sensitive: their value can never be read out in clear.
    return {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.WRAP: True,
            Attribute.UNWRAP: True}


__all__ = ["CURVES", "HsmSession", "ObjectClass", "SessionKey"]
