"""General-glo-ciphering APDUs (tag 0xDB), the security control byte and the AES-GCM IV.

Green Book (IEC 62056-5-3) §9.2.7.2.4: a general-glo-ciphering APDU is

    DB  <len> system-title  <len> ( SC || invocation counter (4, big-endian) || ciphertext || tag )

with both fields A-XDR octet-strings. SC, the security control byte (§9.2.7.2.4.2, Table 38):
bits 0-3 security suite, bit 4 authentication, bit 5 encryption, bit 6 key set (0 unicast,
1 broadcast), bit 7 compression. IV = system title (8 bytes) || invocation counter (4 bytes).
AAD = SC || AK for authenticated data; the tag is the first 12 bytes of the GCM tag.

This module builds and parses the bytes only; no key is ever an argument. Encrypting and
checking live with whoever holds the key (the meter, the HSM).
"""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle.dlms.key_transfer import Reader, encode_length
from lifecycle.errors import DlmsError

GENERAL_GLO_CIPHERING = 0xDB
SYSTEM_TITLE_BYTES = 8
COUNTER_BYTES = 4
TAG_BYTES = 12
_SUITE_MASK, _AUTH, _ENC, _BROADCAST, _COMPRESSION = 0x0F, 0x10, 0x20, 0x40, 0x80


@dataclass(frozen=True)
class SecurityControl:
    """The security control byte, field by field (Green Book Table 38)."""

    suite: int
    authenticated: bool = True
    encrypted: bool = True
    broadcast: bool = False
    compressed: bool = False

    def to_byte(self) -> int:
        """Return the byte.

        Raises:
            DlmsError: the suite does not fit bits 0-3.
        """
        if not 0 <= self.suite <= _SUITE_MASK:
            raise DlmsError("security control", f"suite {self.suite} does not fit 4 bits")
        return (self.suite | _AUTH * self.authenticated | _ENC * self.encrypted
                | _BROADCAST * self.broadcast | _COMPRESSION * self.compressed)

    @classmethod
    def from_byte(cls, value: int) -> SecurityControl:
        """Read a security control byte (any suite number; the caller checks it)."""
        return cls(value & _SUITE_MASK, bool(value & _AUTH), bool(value & _ENC),
                   bool(value & _BROADCAST), bool(value & _COMPRESSION))


@dataclass(frozen=True)
class GloCiphered:
    """A general-glo-ciphering APDU, parsed: who sent it, under which counter, what it carries."""

    system_title: bytes
    security_control: int
    invocation_counter: int
    ciphertext: bytes
    tag: bytes

    @property
    def iv(self) -> bytes:
        """The AES-GCM IV of this APDU: system title || invocation counter."""
        return gcm_iv(self.system_title, self.invocation_counter)

    @property
    def control(self) -> SecurityControl:
        """The security control byte, field by field."""
        return SecurityControl.from_byte(self.security_control)


def gcm_iv(system_title: bytes, invocation_counter: int) -> bytes:
    """Return the 12-byte IV: system title (8 bytes) || invocation counter (4, big-endian).

    Raises:
        DlmsError: the system title is not 8 bytes or the counter does not fit 4 bytes.
    """
    if len(system_title) != SYSTEM_TITLE_BYTES:
        raise DlmsError("system title", f"{len(system_title)} bytes, not 8")
    if not 0 <= invocation_counter <= 0xFFFFFFFF:
        raise DlmsError("invocation counter", f"{invocation_counter} does not fit 4 bytes")
    return system_title + invocation_counter.to_bytes(COUNTER_BYTES, "big")


def encode(apdu: GloCiphered) -> bytes:
    """Return the APDU's bytes.

    Raises:
        DlmsError: a field is out of range (title length, counter, tag length).
    """
    iv = gcm_iv(apdu.system_title, apdu.invocation_counter)
    if len(apdu.tag) != TAG_BYTES:
        raise DlmsError("tag", f"{len(apdu.tag)} bytes, not {TAG_BYTES}")
    content = (bytes([apdu.security_control]) + iv[SYSTEM_TITLE_BYTES:] + apdu.ciphertext
               + apdu.tag)
    return (bytes([GENERAL_GLO_CIPHERING]) + encode_length(SYSTEM_TITLE_BYTES)
            + apdu.system_title + encode_length(len(content)) + content)


def parse(data: bytes) -> GloCiphered:
    """Parse a general-glo-ciphering APDU strictly (authenticated and encrypted only).

    Raises:
        DlmsError: another APDU, a system title not of 8 bytes, an SC without authentication
            and encryption, or a compressed or broadcast one, truncated or trailing bytes.
    """
    reader = Reader(bytes(data), "general-glo-ciphering")
    reader.expect(GENERAL_GLO_CIPHERING, "tag")
    if (n := reader.length()) != SYSTEM_TITLE_BYTES:
        raise DlmsError("general-glo-ciphering system-title", f"{n} bytes, not 8")
    title = reader.take(SYSTEM_TITLE_BYTES)
    size = reader.length()
    if size < 1 + COUNTER_BYTES + TAG_BYTES:
        raise DlmsError("general-glo-ciphering ciphered-content",
                        f"{size} bytes cannot hold SC, counter and tag")
    content = reader.take(size)
    reader.end()
    sc = SecurityControl.from_byte(content[0])
    if not (sc.authenticated and sc.encrypted) or sc.compressed or sc.broadcast:
        raise DlmsError("general-glo-ciphering security control",
                        f"{content[0]:02X} is not authenticated-and-encrypted, unicast, "
                        "uncompressed")
    return GloCiphered(title, content[0], int.from_bytes(content[1:5], "big"),
                       content[5:-TAG_BYTES], content[-TAG_BYTES:])
