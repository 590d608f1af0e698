"""DLMS security suites, NIST SP 800-57 cryptoperiods and accepted algorithms, as data.

Suites: DLMS Green Book (IEC 62056-5-3) security suites 0-2. Key ids: Security Setup (class 64)
``global_key_transfer`` key_id enum.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum

from cryptography.hazmat.primitives import hashes


class KeyId(IntEnum):
    """DLMS key_id of global_key_transfer (Security Setup method 2)."""

    GUEK = 0  # global unicast encryption key
    GBEK = 1  # global broadcast encryption key
    GAK = 2  # authentication key
    KEK = 3  # master key

    @property
    def field(self) -> str:
        """Canonical batch column name of this key."""
        return self.name.lower()


@dataclass(frozen=True)
class Suite:
    """One DLMS security suite."""

    number: int
    name: str
    key_bits: int
    curve: str | None

    @property
    def wrapped_len(self) -> int:
        """Length of a key of this suite wrapped with RFC 3394 (key + 8-byte integrity block)."""
        return self.key_bits // 8 + 8

    @property
    def needs_certificate(self) -> bool:
        return self.curve is not None


SUITES: dict[int, Suite] = {
    0: Suite(0, "AES-GCM-128", 128, None),
    1: Suite(1, "ECDH-ECDSA-AES-GCM-128-SHA-256", 128, "P-256"),
    2: Suite(2, "ECDH-ECDSA-AES-GCM-256-SHA-384", 256, "P-384"),
}

# NIST SP 800-57 Part 1 Rev. 5 §5.3.6: originator-usage periods for symmetric keys. A DLMS
# data-encryption key is a "symmetric data-encryption key" (up to 2 years); a key-wrapping key
# (the DLMS master key) likewise up to 2 years; an authentication key up to 2 years.
CRYPTOPERIODS: dict[KeyId, timedelta] = {
    KeyId.GUEK: timedelta(days=730),
    KeyId.GBEK: timedelta(days=730),
    KeyId.GAK: timedelta(days=730),
    KeyId.KEK: timedelta(days=730),
}

# RSA-OAEP hashes (MGF1 with the same hash, RFC 8017 §7.1) for batch transport keys, strongest
# first. The HSM layer maps each name to its PKCS#11 mechanism; the manifest names the algorithm
# as ``RSA-OAEP-<HASH>``.
OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha1": hashes.SHA1,  # SoftHSM2 2.6.1 unwraps RSA-OAEP with SHA-1 only
}
TRANSPORT_ALGS: dict[str, str] = {f"RSA-OAEP-{name.upper()}": name for name in OAEP_HASHES}

# --- the DSO's PKI (lifecycle.pki) ---------------------------------------------------------------
_YEAR = 365.25
# A meter lives 15 years in the field (the DSO's planning horizon); its operational certificates
# must outlast it, with a year of margin for late installation and late replacement.
DEVICE_CERT_VALIDITY = timedelta(days=round(16 * _YEAR))
# NIST SP 800-57 Part 1 Rev. 5 §5.3.6 (table 1): a private signature key's originator-usage
# period is 1-3 years; a CA key that signs certificates is renewed (new key) after this.
CA_ISSUING_PERIOD = timedelta(days=round(3 * _YEAR))
# A sub-CA certificate outlives the last device certificate it may sign (shell model: openssl
# and most meters check every certificate of the chain at the same time).
SUB_CA_VALIDITY = CA_ISSUING_PERIOD + DEVICE_CERT_VALIDITY
# The root signs sub-CAs over its own issuing period of twice theirs, so it outlives them too.
ROOT_CA_VALIDITY = 2 * CA_ISSUING_PERIOD + SUB_CA_VALIDITY
# The firmware signing certificate: a leaf of the root, renewed at a ceremony.
FIRMWARE_CERT_VALIDITY = timedelta(days=round(5 * _YEAR))
# CRL nextUpdate (RFC 5280 §5.1.2.5): the online sub-CAs publish weekly (``meterkeys pki crl``
# on a schedule); the offline root at each ceremony, at least yearly.
CRL_NEXT_UPDATE = timedelta(days=7)
ROOT_CRL_NEXT_UPDATE = timedelta(days=365)
# RFC 5280 §4.1.2.2: at most 20 octets, positive; 159 random bits keep the DER INTEGER positive
# and within 20 octets (CA/Browser Forum asks 64 bits at least).
SERIAL_BITS = 159


def storage_kek_role(key_id: KeyId) -> str:
    """Return which storage KEK wraps a meter key: the master key has its own.

    A KEK has one unwrap template, so what a key may do once unwrapped from storage is decided
    by the KEK it is stored under: the usage keys (GUEK, GBEK, GAK) come out for AES-GCM only,
    the meter's master key for AES key wrap only (new keys for the meter).
    """
    return "storage-kek-master" if key_id == KeyId.KEK else "storage-kek"
