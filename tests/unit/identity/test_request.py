"""Signed requests: canonical form (known answer), tampering, strict decoding."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from lifecycle.errors import RequestError
from lifecycle.identity import keys, request
from lifecycle.identity.request import Request, SignedRequest

KAT = json.loads((Path(__file__).resolve().parents[2] / "data" / "identity" /
                  "request-kat.json").read_text(encoding="utf-8"))
T0 = datetime(2025, 3, 1, 12, 30, 5, 123456, tzinfo=UTC)


class _Ed:
    def __init__(self, seed: bytes) -> None:
        self.key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)

    def public_key_pem(self) -> str:
        return str(KAT["public_pem"])

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


SIGNER = _Ed(base64.urlsafe_b64decode(KAT["seed_b64url"] + "="))


def _kat_request() -> SignedRequest:
    return request.make(KAT["action"], KAT["params"], KAT["principal"], KAT["installation"],
                        T0, SIGNER, nonce=KAT["nonce"])


def test_params_digest_is_sha256_of_the_canonical_json_in_base64url() -> None:
    text = '{"file":"/data/acme-0001.csv","mapping":null,"vendor":"acme","workers":4}'
    expected = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
    assert request.params_digest(KAT["params"]) == "sha256:" + expected.decode()
    assert request.params_digest(KAT["params"]) == KAT["params_digest"]
    reordered = dict(reversed(list(KAT["params"].items())))
    assert request.params_digest(reordered) == KAT["params_digest"]


def test_message_and_signature_are_the_known_answer() -> None:
    signed = _kat_request()
    assert signed.request.message() == KAT["message"].encode("ascii")
    assert signed.request.message() == (
        b'{"action":"batch.import","installation":"6f1c2b1e-8d3a-4c55-9a7e-0b1d2c3e4f50",'
        b'"nonce":"AAAAAAAAAAAAAAAAAAAAAA","params_digest":"' + KAT["params_digest"].encode()
        + b'","principal":"olga","purpose":"meterkeys-request/1",'
        b'"time":"2025-03-01T12:30:05.123456+00:00"}')
    assert signed.signature == KAT["signature"]  # Ed25519 is deterministic (RFC 8032)
    keys.verify(KAT["public_pem"], signed.signature, signed.request.message())


def test_a_time_in_another_zone_signs_the_same_utc_message() -> None:
    other = T0.astimezone(timezone(timedelta(hours=5)))
    signed = request.make(KAT["action"], KAT["params"], KAT["principal"], KAT["installation"],
                          other, SIGNER, nonce=KAT["nonce"])
    assert signed.signature == KAT["signature"]


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        request.make("batch.import", {}, "olga", "i", T0.replace(tzinfo=None), SIGNER)


@pytest.mark.parametrize(("field", "value"), [
    pytest.param("action", "hsm.backup", id="action"),
    pytest.param("params_digest", request.params_digest({"file": "other.csv"}), id="params"),
    pytest.param("principal", "eve", id="principal"),
    pytest.param("nonce", "BBBBBBBBBBBBBBBBBBBBBB", id="nonce"),
    pytest.param("time", T0 + timedelta(microseconds=1), id="time"),
    pytest.param("installation", "6f1c2b1e-8d3a-4c55-9a7e-0b1d2c3e4f51", id="installation"),
])
def test_a_tampered_field_breaks_the_signature(field: str, value: Any) -> None:
    signed = _kat_request()
    tampered = dataclasses.replace(signed.request, **{field: value})
    keys.verify(KAT["public_pem"], signed.signature, signed.request.message())
    with pytest.raises(RequestError, match="does not verify"):
        keys.verify(KAT["public_pem"], signed.signature, tampered.message())


def test_encode_decode_round_trip() -> None:
    signed = _kat_request()
    again = request.decode(request.encode([signed, signed]))
    assert again == [signed, signed]
    assert isinstance(again[0].request, Request)
    assert again[0].request.time == T0


def _entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = _kat_request().to_dict()
    for name, value in changes.items():
        if value is _DROP:
            del entry[name]
        else:
            entry[name] = value
    return entry


_DROP = object()
GOOD = _kat_request().to_dict()

DECODE_CASES = [
    pytest.param("not json", "not JSON", id="not-json"),
    pytest.param(json.dumps(GOOD), "not a JSON array", id="object-not-array"),
    pytest.param("[]", "holds 0 requests", id="empty"),
    pytest.param(json.dumps([GOOD] * 9), "holds 9 requests", id="nine"),
    pytest.param("[" + " " * (64 * 1024) + "]", "longer than", id="too-long"),
    pytest.param(json.dumps(["x"]), "request 1: not a JSON object", id="entry-not-object"),
    pytest.param(json.dumps([_entry(nonce=_DROP)]), "field 'nonce': missing", id="missing"),
    pytest.param(json.dumps([_entry(extra="x")]), "field 'extra': unknown", id="unknown-field"),
    pytest.param(json.dumps([_entry(principal=7)]), "field 'principal': not a non-empty",
                 id="wrong-type"),
    pytest.param(json.dumps([_entry(principal="")]), "field 'principal': not a non-empty",
                 id="empty-principal"),
    pytest.param(json.dumps([_entry(principal=" olga")]), "surrounding spaces",
                 id="padded-principal"),
    pytest.param(json.dumps([_entry(action="HSM.backup")]), "not an action name",
                 id="bad-action"),
    pytest.param(json.dumps([_entry(params_digest="sha256:" + "a" * 64)]),
                 "field 'params_digest'", id="hex-digest"),
    pytest.param(json.dumps([_entry(nonce="short")]), "field 'nonce'", id="short-nonce"),
    pytest.param(json.dumps([_entry(nonce="a/b+c=" * 4)]), "field 'nonce'", id="nonce-charset"),
    pytest.param(json.dumps([_entry(time="yesterday")]), "field 'time': not ISO 8601",
                 id="bad-time"),
    pytest.param(json.dumps([_entry(time="2025-03-01T12:30:05")]), "has no time zone",
                 id="naive-time"),
    pytest.param(json.dumps([_entry(signature="a+b/")]), "field 'signature': not base64url",
                 id="signature-not-base64url"),
    pytest.param(json.dumps([_entry(signature="x" * 300)]), "too long", id="long-signature"),
    pytest.param(json.dumps([_entry(installation="i\nj")]), "not printable",
                 id="control-character"),
    pytest.param('[{"action":"a","action":"b"}]', "appears twice", id="duplicate-field"),
]


@pytest.mark.parametrize(("text", "message"), DECODE_CASES)
def test_decode_is_strict_and_names_the_field(text: str, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        request.decode(text)


def test_from_dict_names_the_request_index() -> None:
    with pytest.raises(RequestError, match="request 2 field 'nonce'"):
        request.decode(json.dumps([GOOD, _entry(nonce=_DROP)]))
