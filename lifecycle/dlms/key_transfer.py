"""key_data of DLMS Security Setup (class id 64) method 2 ``global_key_transfer``.

Blue Book (IEC 62056-6-2) §4.4.7: ``key_data`` is an array of structures
{key_id: enum, key_wrapped: octet-string}; each key is wrapped with the meter's current master
key by AES key wrap (RFC 3394), which is the caller's business: this module only encodes and
decodes, strictly. A-XDR (IEC 61334-6): array ``01 <n>``, structure ``02 02``, enum ``16 <id>``,
octet-string ``09 <len> <bytes>``; a length below 0x80 is one byte, else ``0x80|n`` and n bytes.

Order matters: a meter applies the keys in array order and may stop at any point (power loss).
``TRANSFER_ORDER`` puts the master key last and the proven key (GUEK) after the other usage keys,
so a proof under the new GUEK means GBEK, GAK and GUEK are new and only the master key may lag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lifecycle.errors import DlmsError
from lifecycle.policy import KeyId

ARRAY, STRUCTURE, OCTET_STRING, ENUM = 0x01, 0x02, 0x09, 0x16
TRANSFER_ORDER = (KeyId.GBEK, KeyId.GAK, KeyId.GUEK, KeyId.KEK)
# RFC 3394 output of a 128- or 256-bit key: the key plus the 8-byte integrity block.
WRAPPED_LENGTHS = (24, 40)


@dataclass(frozen=True)
class KeyEntry:
    """One element of key_data: a key id and that key wrapped under the meter's master key."""

    key_id: KeyId
    wrapped: bytes = b""

    def __repr__(self) -> str:  # the wrapped bytes are not secret, but keep them out of logs
        return f"KeyEntry({self.key_id.name}, {len(self.wrapped)} bytes)"


def encode_length(n: int) -> bytes:
    """Return the A-XDR length of ``n``.

    Raises:
        DlmsError: ``n`` is negative or does not fit four bytes.
    """
    if n < 0 or n > 0xFFFFFFFF:
        raise DlmsError("length", f"{n} is out of range")
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def encode(entries: Sequence[KeyEntry]) -> bytes:
    """Return key_data for the entries, in their order.

    Raises:
        DlmsError: no entry, a key id twice, or a wrapped key of a length no suite uses.
    """
    check_entries(entries)
    out = bytearray([ARRAY]) + encode_length(len(entries))
    for entry in entries:
        out += bytes([STRUCTURE, 2, ENUM, int(entry.key_id), OCTET_STRING])
        out += encode_length(len(entry.wrapped)) + entry.wrapped
    return bytes(out)


def check_entries(entries: Sequence[KeyEntry]) -> None:
    """Refuse an empty list, a repeated key id or a wrapped length no suite uses.

    Raises:
        DlmsError: naming the entry.
    """
    if not entries:
        raise DlmsError("key_data", "holds no key")
    seen: set[KeyId] = set()
    for index, entry in enumerate(entries):
        if entry.key_id in seen:
            raise DlmsError(f"key_data[{index}]", f"key id {entry.key_id.name} appears twice")
        seen.add(entry.key_id)
        if len(entry.wrapped) not in WRAPPED_LENGTHS:
            raise DlmsError(f"key_data[{index}].key_wrapped",
                            f"{len(entry.wrapped)} bytes is not an RFC 3394 wrap of an "
                            "AES-128 or AES-256 key")


def decode(data: bytes) -> list[KeyEntry]:
    """Decode key_data strictly: exact tags, known key ids, no repeat, no trailing bytes.

    Raises:
        DlmsError: naming the field and byte offset that failed.
    """
    reader = Reader(bytes(data), "key_data")
    reader.expect(ARRAY, "array")
    count = reader.length()
    entries = []
    for index in range(count):
        where = f"key_data[{index}]"
        reader.expect(STRUCTURE, f"{where} structure")
        if (n := reader.length()) != 2:
            raise DlmsError(f"{where} at byte {reader.pos}", f"structure of {n} elements, not 2")
        reader.expect(ENUM, f"{where}.key_id")
        raw = reader.take(1)[0]
        if raw not in KeyId._value2member_map_:
            raise DlmsError(f"{where}.key_id at byte {reader.pos - 1}", f"unknown key id {raw}")
        reader.expect(OCTET_STRING, f"{where}.key_wrapped")
        entries.append(KeyEntry(KeyId(raw), reader.take(reader.length())))
    reader.end()
    check_entries(entries)
    return entries


class Reader:
    """A cursor over A-XDR bytes that refuses, rather than overruns, short input."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.pos = 0
        self.name = name

    def take(self, n: int) -> bytes:
        """Return the next ``n`` bytes.

        Raises:
            DlmsError: fewer than ``n`` bytes are left.
        """
        if n < 0 or self.pos + n > len(self.data):
            raise DlmsError(f"{self.name} at byte {self.pos}",
                            f"truncated: {n} bytes wanted, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def expect(self, tag: int, field: str) -> None:
        """Consume one tag byte.

        Raises:
            DlmsError: the byte is another tag.
        """
        at = self.pos
        got = self.take(1)[0]
        if got != tag:
            raise DlmsError(f"{self.name} {field} at byte {at}",
                            f"expected tag {tag:02X}, got {got:02X}")

    def length(self) -> int:
        """Consume an A-XDR length (the shortest form only).

        Raises:
            DlmsError: truncated, longer than 4 bytes, or not in its shortest form.
        """
        at = self.pos
        first = self.take(1)[0]
        if first < 0x80:
            return first
        size = first & 0x7F
        if not 1 <= size <= 4:
            raise DlmsError(f"{self.name} length at byte {at}", f"{size} length bytes")
        value = int.from_bytes(self.take(size), "big")
        if encode_length(value) != self.data[at:self.pos]:
            raise DlmsError(f"{self.name} length at byte {at}", "not in its shortest form")
        return value

    def end(self) -> None:
        """Refuse trailing bytes.

        Raises:
            DlmsError: bytes are left after the value.
        """
        if self.pos != len(self.data):
            raise DlmsError(f"{self.name} at byte {self.pos}",
                            f"{len(self.data) - self.pos} trailing bytes")
