"""DLMS work in the HSM: new meter keys for a key transfer, and the check of a meter's proof.

Built on ``HsmSession``'s public operations only; every key here is a session object of one
session and is destroyed before the call returns. What leaves is wrapped key material (storage
blobs, transfer wraps) and a yes or no, never a key.

New keys (``new_dlms_keys``). Each key is generated in the HSM as an in-flight session object:
sensitive, no usage, and *extractable*, because C_WrapKey requires CKA_EXTRACTABLE on the key it
wraps (PKCS#11 v2.40 §5.13). It is wrapped twice (RFC 3394): under its storage KEK (the blob to
store as the pending version) and under the meter's current master key, unwrapped from its blob
with the master KEK's template (a wrap-only, non-extractable session key). Standard PKCS#11 cannot
say "wrap only under this meter's master key" (shared reference "pkcs11.md" §6), so the
extractable object never outlives this call: both wraps are made at once and it is destroyed.

The proof (``gcm_ciphertext_matches``). DLMS authenticates with AAD = SC || AK, the AK's value,
which no PKCS#11 mechanism can take from a key object; but GCM's ciphertext does not depend on
the AAD (NIST SP 800-38D §7.1: it is AES-CTR under the encryption key). So the candidate GUEK is
unwrapped from its blob (it comes out for AES-GCM only), the expected plaintext is encrypted with
the meter's IV and an empty AAD, and the ciphertext parts are compared in constant time. The tag
is the HES's to check: it holds the AK by DLMS's design.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from lifecycle.errors import IntegrityError, PermanentHsmError
from lifecycle.hsm.session import HsmSession, SessionKey

KEY_BITS = (128, 256)
GCM_TAG_BITS = 96  # Green Book: the DLMS tag is the first 12 bytes of the GCM tag


@dataclass(frozen=True)
class NewKey:
    """A key generated in the HSM, as wrapped bytes only: its blob under the storage KEK, and
    the same key wrapped under the meter's current master key (for key_data)."""

    key_id: int
    blob: bytes
    transfer_wrapped: bytes

    def __repr__(self) -> str:
        return f"NewKey({self.key_id}, blob {len(self.blob)} bytes)"


def new_dlms_keys(hs: HsmSession, master_kek_label: str, master_blob: bytes,
                  storage_kek_labels: Sequence[str], key_ids: Sequence[int],
                  bits: int) -> list[NewKey]:
    """Generate new keys for one meter, each wrapped for storage and for the meter.

    ``storage_kek_labels[i]`` is the KEK that stores ``key_ids[i]`` (``policy.storage_kek_role``).
    Every session object made here is destroyed before returning, also on error.

    Raises:
        IntegrityError: the master blob does not unwrap (wrong KEK, tampering).
        KeyPolicyError: a KEK is not the pinned one or is weaker than policy.
        PermanentHsmError: key ids and labels differ in number, or ``bits`` is not 128 or 256.
    """
    if len(storage_kek_labels) != len(key_ids):
        raise PermanentHsmError("new DLMS keys", f"{len(key_ids)} key ids but "
                                                 f"{len(storage_kek_labels)} storage KEKs")
    if bits not in KEY_BITS:
        raise PermanentHsmError("new DLMS keys", f"AES-{bits} is no DLMS suite's key size")
    with hs.scoped(hs.unwrap_stored(master_kek_label, master_blob)) as master:
        return [_new_key(hs, master, label, key_id, bits)
                for label, key_id in zip(storage_kek_labels, key_ids, strict=True)]


def _new_key(hs: HsmSession, master: SessionKey, kek_label: str, key_id: int,
             bits: int) -> NewKey:
    with hs.scoped(hs.generate_session_aes(bits)) as key:
        return NewKey(key_id, hs.wrap_aes(kek_label, key), hs.wrap_aes(master, key))


@dataclass(frozen=True)
class CiphertextCheck:
    """One proof to check: the candidate GUEK's blob, the meter's IV, the expected plaintext
    (the challenge) and the ciphertext part of the meter's answer."""

    guek_blob: bytes
    iv: bytes
    plaintext: bytes
    ciphertext: bytes


def gcm_ciphertexts_match(hs: HsmSession, kek_label: str,
                          checks: Sequence[CiphertextCheck]) -> list[bool]:
    """Return, per check, whether the GUEK encrypts the plaintext to the given ciphertext.

    A blob that does not unwrap is a ``False`` (it cannot be the key the meter holds). Each
    GUEK is destroyed at once.

    Raises:
        KeyPolicyError: the KEK is not the pinned one or is weaker than policy.
        TransientHsmError / PermanentHsmError: the HSM failed as a whole.
    """
    return [_matches(hs, kek_label, check) for check in checks]


def gcm_ciphertext_matches(hs: HsmSession, kek_label: str, guek_blob: bytes, iv: bytes,
                           plaintext: bytes, ciphertext: bytes) -> bool:
    """Return whether the GUEK in ``guek_blob`` encrypts ``plaintext`` under ``iv`` to
    ``ciphertext`` (the tag is not compared: see the module docstring).

    Raises:
        KeyPolicyError / HsmError: as ``gcm_ciphertexts_match``.
    """
    return _matches(hs, kek_label, CiphertextCheck(guek_blob, iv, plaintext, ciphertext))


def _matches(hs: HsmSession, kek_label: str, check: CiphertextCheck) -> bool:
    try:
        guek = hs.unwrap_stored(kek_label, check.guek_blob)
    except IntegrityError:
        return False
    with hs.scoped(guek):
        out = hs.gcm_encrypt(guek, check.iv, b"", check.plaintext, GCM_TAG_BITS)
    expected = out[:len(out) - GCM_TAG_BITS // 8]
    return hmac.compare_digest(expected, check.ciphertext)
