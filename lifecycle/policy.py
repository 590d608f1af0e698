"""DLMS security suites and NIST SP 800-57 cryptoperiods, as data.

Suites: DLMS Green Book (IEC 62056-5-3) security suites 0-2. Key ids: Security Setup (class 64)
``global_key_transfer`` key_id enum.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum


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
