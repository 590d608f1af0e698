"""A simulated meter: the keys it holds and the Security Setup key transfer it accepts.

It plays the meter's side of DLMS Security Setup (class id 64) method 2 ``global_key_transfer``
(DLMS Green Book, IEC 62056-5-3 / Blue Book IEC 62056-6-2): ``key_data`` is an A-XDR array of
structures {key_id: enum, key_wrapped: octet-string}, each key wrapped with the meter's current
master key by AES key wrap (RFC 3394).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from lifecycle.policy import SUITES, KeyId

# A-XDR tags (Blue Book, data types): array, structure, octet-string, enum.
_ARRAY, _STRUCTURE, _OCTET_STRING, _ENUM = 0x01, 0x02, 0x09, 0x16


class KeyTransferRejected(Exception):
    """The meter refuses a key transfer; it keeps every key it had."""

    def __init__(self, serial: str, reason: str) -> None:
        self.serial = serial
        self.reason = reason
        super().__init__(f"meter {serial}: key transfer rejected: {reason}")


@dataclass
class SimulatedMeter:
    """A meter with its current keys (plaintext: only the meter and the HSM see these)."""

    serial: str
    system_title: bytes
    suite: int
    keys: dict[KeyId, bytes] = field(repr=False)
    transfers: int = 0

    @classmethod
    def from_secrets(cls, record: Mapping[str, Any]) -> SimulatedMeter:
        """Build a meter from one record of ``read_meter_secrets``."""
        return cls(serial=str(record["serial"]),
                   system_title=bytes.fromhex(str(record["system_title"])),
                   suite=int(record["suite"]),
                   keys={k: bytes.fromhex(str(record[k.field])) for k in KeyId})

    def key(self, key_id: KeyId) -> bytes:
        """Return a key the meter holds."""
        return self.keys[key_id]

    def apply_key_transfer(self, key_data: bytes) -> list[KeyId]:
        """Unwrap and install the keys of a ``global_key_transfer``; return their ids.

        All keys are unwrapped with the master key held *before* the call, also when the
        transfer replaces the master key itself, and installed only if every one unwraps:
        a meter never ends up with half a key set.

        Raises:
            KeyTransferRejected: malformed key_data, unknown or repeated key id, wrong key
                length for the suite, or a failed RFC 3394 integrity check.
        """
        entries = self._decode(key_data)
        kek = self.keys[KeyId.KEK]
        size = SUITES[self.suite].key_bits // 8
        new: dict[KeyId, bytes] = {}
        for key_id, wrapped in entries:
            if key_id in new:
                raise KeyTransferRejected(self.serial, f"key id {key_id.name} appears twice")
            try:
                key = aes_key_unwrap(kek, wrapped)
            except (InvalidUnwrap, ValueError):
                # RFC 3394 §2.2.3: the initial value check failed (wrong KEK or tampering).
                raise KeyTransferRejected(self.serial,
                                          f"{key_id.name} fails the key wrap check") from None
            if len(key) != size:
                raise KeyTransferRejected(self.serial, f"{key_id.name} is {len(key) * 8} bits, "
                                                       f"suite {self.suite} needs {size * 8}")
            new[key_id] = key
        self.keys.update(new)
        self.transfers += 1
        return list(new)

    def _decode(self, data: bytes) -> list[tuple[KeyId, bytes]]:
        reader = _Reader(data, self.serial)
        reader.expect(_ARRAY)
        entries = []
        for _ in range(reader.length()):
            reader.expect(_STRUCTURE)
            if reader.length() != 2:
                raise KeyTransferRejected(self.serial, "key_data structure is not of 2 elements")
            reader.expect(_ENUM)
            raw_id = reader.take(1)[0]
            if raw_id not in KeyId._value2member_map_:
                raise KeyTransferRejected(self.serial, f"unknown key id {raw_id}")
            reader.expect(_OCTET_STRING)
            entries.append((KeyId(raw_id), reader.take(reader.length())))
        if reader.pos != len(data):
            raise KeyTransferRejected(self.serial, "trailing bytes after key_data")
        if not entries:
            raise KeyTransferRejected(self.serial, "key_data holds no key")
        return entries


class _Reader:
    """A cursor over A-XDR bytes that rejects, rather than overruns, short input."""

    def __init__(self, data: bytes, serial: str) -> None:
        self.data = data
        self.pos = 0
        self.serial = serial

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise KeyTransferRejected(self.serial, "key_data is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def expect(self, tag: int) -> None:
        got = self.take(1)[0]
        if got != tag:
            raise KeyTransferRejected(self.serial, f"expected A-XDR tag {tag:02X}, got {got:02X}")

    def length(self) -> int:
        # A-XDR length: one byte below 0x80, else 0x80 | n followed by n big-endian bytes.
        first = self.take(1)[0]
        if first < 0x80:
            return first
        return int.from_bytes(self.take(first & 0x7F), "big")
