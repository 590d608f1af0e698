"""The binding of a key blob to what it belongs to, pure.

A blob is a meter key wrapped under a storage KEK (RFC 3394). Wrapping alone says nothing of
*whose* key it is: anyone who can write the inventory could move a blob to another meter or key
id, or plant a blob of a key they know (wrapped under the KEK by anyone holding the PIN). So each
blob carries a MAC made in the HSM (AES-CMAC, NIST SP 800-38B, under a non-extractable key) over

    "meterkeys-key-blob/1" 0x00 || field || field || ...

with each field length-prefixed (2 bytes, big-endian), in this order: meter serial, system title
(hex, upper case), key id (DLMS key_id, 1 byte), version (4 bytes), KEK label, blob. A moved,
swapped or planted blob then fails verification, and the HSM is the only place a valid MAC can be
made: the MAC key may only sign and verify with AES-CMAC.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = b"meterkeys-key-blob/1\x00"
TAG_BYTES = 16


@dataclass(frozen=True)
class BlobContext:
    """What a blob belongs to: the meter, its key id and version, and the KEK it is under."""

    serial: str
    system_title: str
    key_id: int
    version: int
    kek_label: str


def message(context: BlobContext, blob: bytes) -> bytes:
    """Return the bytes a blob's MAC covers.

    Raises:
        ValueError: a field does not fit its length prefix, or the key id or version is out of
            range.
    """
    if not 0 <= context.key_id <= 0xFF or not 0 < context.version <= 0xFFFFFFFF:
        raise ValueError(f"key id {context.key_id} or version {context.version} out of range")
    fields = (context.serial.encode(), context.system_title.upper().encode(),
              context.key_id.to_bytes(1, "big"), context.version.to_bytes(4, "big"),
              context.kek_label.encode(), bytes(blob))
    out = bytearray(DOMAIN)
    for field in fields:
        if len(field) > 0xFFFF:
            raise ValueError("a bound field is longer than 65535 bytes")
        out += len(field).to_bytes(2, "big") + field
    return bytes(out)
