"""The pure rules of signed heads and the witness: digests, record lines, verification verdicts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from lifecycle.audit import chain, witness
from lifecycle.audit.chain import Anchors, Checkpoint, SignedHead, WitnessLog
from lifecycle.errors import AuditError

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
INSTALLATION = "3f2b1c4d-0a1b-4c2d-8e9f-001122334455"
KEY = ec.generate_private_key(ec.SECP256R1())
PEM = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()
FINGERPRINT = chain.key_fingerprint(PEM)


def test_the_digest_is_domain_separated_and_canonical() -> None:
    head = "ab" * 32
    body = ('{"head":"' + head + '","installation":"' + INSTALLATION + '","purpose":'
            '"meterkeys-audit-checkpoint/1","seq":7,"time":"2025-03-01T12:00:00.000000+00:00"}')
    assert chain.checkpoint_digest(INSTALLATION, 7, head, T0) == \
        hashlib.sha256(body.encode("ascii")).digest()
    # Not the digest of the format before issue 11 (seq || head), nor of another installation.
    assert chain.checkpoint_digest(INSTALLATION, 7, head, T0) != \
        hashlib.sha256((7).to_bytes(8, "big") + bytes.fromhex(head)).digest()
    assert chain.checkpoint_digest(INSTALLATION, 7, head, T0) != \
        chain.checkpoint_digest(INSTALLATION.replace("3f", "4f"), 7, head, T0)


@pytest.mark.parametrize(("seq", "head"), [
    pytest.param(0, "ab" * 32, id="seq-0"),
    pytest.param(1, "AB" * 32, id="upper-hex"),
    pytest.param(1, "ab" * 31, id="short"),
])
def test_the_digest_refuses_what_names_no_event(seq: int, head: str) -> None:
    with pytest.raises(ValueError, match="names an event"):
        chain.checkpoint_digest(INSTALLATION, seq, head, T0)


def test_a_record_line_round_trips() -> None:
    record = _signed(3, "cd" * 32)
    line = witness.encode(record)
    assert "\n" not in line and json.loads(line)["purpose"] == chain.CHECKPOINT_PURPOSE
    assert witness.decode(line) == record


@pytest.mark.parametrize("change", [
    pytest.param({"purpose": "meterkeys-backup/1"}, id="purpose"),
    pytest.param({"seq": "3"}, id="seq-text"),
    pytest.param({"time": "2025-03-01T12:00:00"}, id="naive-time"),
    pytest.param({"signature": "not base64!"}, id="signature"),
    pytest.param({"key": None}, id="key"),
])
def test_a_bad_record_line_is_refused(change: dict[str, Any]) -> None:
    data = json.loads(witness.encode(_signed(3, "cd" * 32)))
    with pytest.raises(ValueError):
        witness.decode(json.dumps({**data, **change}))


# --- verification against the witness, in memory -----------------------------------------------
class Row:
    """A stored event as the inventory streams it: attribute access and ``_mapping``."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self._mapping = fields
        self.__dict__.update(fields)


def _rows(n: int) -> list[dict[str, Any]]:
    actor = chain.Actor("alice", "operator")
    rows = [chain.prepare(actor, T0 + timedelta(seconds=i),
                          {"action": "meter.read", "outcome": "ok", "detail": {"n": i}})
            for i in range(n)]
    chain.link(rows, 0, chain.GENESIS)
    return rows


def _signed(seq: int, head: str, installation: str = INSTALLATION) -> SignedHead:
    unsigned = SignedHead(installation, seq, head, T0, b"", FINGERPRINT)
    signature = KEY.sign(unsigned.digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
    return replace(unsigned, signature=signature)


def _verify(rows: list[dict[str, Any]], witnessed: list[SignedHead],
            stored: list[SignedHead] | None = None, installation: str | None = INSTALLATION,
            log_installation: str | None = INSTALLATION) -> int:
    stored = witnessed if stored is None else stored
    checkpoints = [Checkpoint(i, s.seq, s.head_hash, s.at, s.signature)
                   for i, s in enumerate(stored, 1)]
    head = (rows[-1]["seq"], rows[-1]["hash"]) if rows else None
    log = WitnessLog("witness.jsonl", log_installation if witnessed else None, tuple(witnessed))
    return chain.verify_chain([Row(r) for r in rows], checkpoints, head,
                              Anchors(PEM, FINGERPRINT, installation, log))


def test_a_witnessed_trail_verifies() -> None:
    rows = _rows(6)
    assert _verify(rows, [_signed(2, rows[1]["hash"]), _signed(6, rows[5]["hash"])]) == 6
    assert _verify(rows, []) == 6  # nothing signed yet: nothing to witness


def test_a_rewritten_prefix_is_named_after_the_last_matching_head() -> None:
    rows = _rows(6)
    witnessed = [_signed(2, rows[1]["hash"]), _signed(5, rows[4]["hash"])]
    forged = _rows(6)
    forged[3]["principal"] = "mallory"
    chain.link(forged[3:], 3, forged[2]["hash"])
    forged[:3] = rows[:3]
    with pytest.raises(AuditError) as info:
        _verify(forged, witnessed, stored=[])
    assert info.value.seq == 3
    assert "up to 5" in info.value.reason


@pytest.mark.parametrize(("witnessed_at", "stored_at", "seq", "words"), [
    pytest.param([2, 4], [2], 4, "missing from the inventory", id="checkpoint-deleted"),
    pytest.param([2, 9], [2], 7, "truncated", id="truncated"),
])
def test_witness_findings(witnessed_at: list[int], stored_at: list[int], seq: int,
                          words: str) -> None:
    rows = _rows(6)
    heads = {s: rows[s - 1]["hash"] if s <= 6 else "ef" * 32 for s in witnessed_at}
    witnessed = [_signed(s, heads[s]) for s in witnessed_at]
    with pytest.raises(AuditError) as info:
        _verify(rows, witnessed, stored=[w for w in witnessed if w.seq in stored_at])
    assert info.value.seq == seq
    assert words in info.value.reason


def test_an_emptied_trail_is_named() -> None:
    witnessed = [_signed(3, "ab" * 32)]
    with pytest.raises(AuditError) as info:
        _verify([], witnessed, stored=[])
    assert (info.value.seq, "emptied" in info.value.reason) == (1, True)


def test_a_witness_of_another_installation_is_named() -> None:
    rows = _rows(2)
    other = "99999999-0a1b-4c2d-8e9f-001122334455"
    with pytest.raises(AuditError, match="belongs to installation 9999"):
        _verify(rows, [_signed(2, rows[1]["hash"], other)], stored=[],
                log_installation=other)
    with pytest.raises(AuditError, match="names another installation"):
        _verify(rows, [_signed(2, rows[1]["hash"], other)])
