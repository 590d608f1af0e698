"""The proof of possession, pure: the challenge and every check of an answer that needs no key.

A meter proves it holds a GUEK by answering a fresh 16-byte challenge with a general-glo-ciphering
APDU whose plaintext is the challenge (see ``lifecycle.dlms``). Before the HSM compares
ciphertexts, ``parse_answer`` checks what can be checked without a key: that the APDU is
well-formed, comes from the meter's system title, names the meter's suite, carries a counter above
the last one seen for the key version, and has a ciphertext as long as the challenge (GCM is a
stream mode: ciphertext and plaintext have one length).
"""

from __future__ import annotations

import secrets

from lifecycle.dlms import apdu
from lifecycle.dlms.apdu import GloCiphered, SecurityControl
from lifecycle.dlms.counter import check_counter
from lifecycle.errors import ProofRefused

CHALLENGE_BYTES = 16


def new_challenge() -> bytes:
    """Return a fresh random challenge (16 bytes from the OS CSPRNG)."""
    return secrets.token_bytes(CHALLENGE_BYTES)


def parse_answer(data: bytes, system_title: bytes, suite: int, challenge: bytes,
                 last_seen: int | None) -> GloCiphered:
    """Parse a meter's proof APDU and check all that needs no key.

    Raises:
        DlmsError: the APDU is malformed.
        ProofRefused: another system title or suite, or a ciphertext not of the challenge's
            length.
        CounterReplayed: the counter is at or below ``last_seen``.
    """
    answer = apdu.parse(data)
    who = f"meter {system_title.hex().upper()}"
    if answer.system_title != system_title:
        raise ProofRefused(who, f"answer comes from system title "
                                f"{answer.system_title.hex().upper()}")
    expected = SecurityControl(suite).to_byte()
    if answer.security_control != expected:
        raise ProofRefused(who, f"security control {answer.security_control:02X}, expected "
                                f"{expected:02X} (suite {suite})")
    if len(answer.ciphertext) != len(challenge):
        raise ProofRefused(who, f"ciphertext of {len(answer.ciphertext)} bytes for a "
                                f"{len(challenge)}-byte challenge")
    check_counter(last_seen, answer.invocation_counter)
    return answer
