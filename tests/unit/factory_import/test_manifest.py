"""The manifest parser as a table of deliveries: every malformed manifest is refused by one
``ManifestError`` that names it, never by a raw exception (docs/batch-format.md section 5).

Manifests are written here from the document alone: plain ``json``, an independent canonical
form, and ``cryptography`` keys made for the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lifecycle.errors import ManifestError
from lifecycle.factory_import.batch_format import canonical_bytes, load_manifest

DATA = "acme-0001.csv"
_SIGNING = ec.generate_private_key(ec.SECP256R1())
_IMPORT = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: Any) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _spki_sha256(key: Any) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _escape(text: str, upper: bool) -> str:
    # Section 5.1 step 2, written from the document: JSON string escapes, every non-ASCII
    # character as \uXXXX (UTF-16 code units), hex digits in lower case.
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20 or ord(ch) > 0x7E:
            units = ch.encode("utf-16-be")
            for i in range(0, len(units), 2):
                code = f"{int.from_bytes(units[i:i + 2], 'big'):04x}"
                out.append("\\u" + (code.upper() if upper else code))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def independent_canonical(value: Any, upper: bool = False) -> str:
    """Canonical JSON per section 5.1, without json.dumps."""
    if isinstance(value, dict):
        items = sorted(value.items())  # by code point
        return "{" + ",".join(f"{_escape(k, upper)}:{independent_canonical(v, upper)}"
                              for k, v in items) + "}"
    if isinstance(value, str):
        return _escape(value, upper)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(independent_canonical(v, upper) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    raise TypeError(type(value))


def _document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": "meterkeys-batch/1", "vendor": "acme", "batch_ref": "acme-0001",
        "file_name": DATA, "file_sha256": "ab" * 32, "record_count": 6,
        "created": "2026-11-28T16:08:29Z",
        "transport_key": {"alg": "RSA-OAEP-SHA256", "import_key_sha256": _spki_sha256(_IMPORT),
                          "wrapped": base64.b64encode(b"\x01" * 256).decode()}}
    doc.update(changes)
    return doc


def _sign(doc: dict[str, Any], upper: bool = False) -> dict[str, Any]:
    body = {k: v for k, v in doc.items() if k != "signature"}
    value = _SIGNING.sign(independent_canonical(body, upper).encode("ascii"),
                          ec.ECDSA(hashes.SHA256()))
    return {**doc, "signature": {"alg": "ECDSA-P256-SHA256",
                                 "value": base64.b64encode(value).decode()}}


def _load(tmp_path: Path, raw: bytes) -> Any:
    (tmp_path / (DATA + ".manifest.json")).write_bytes(raw)
    return load_manifest(tmp_path / DATA, _pem(_SIGNING), _pem(_IMPORT), "acme")


def _signed_text(**changes: Any) -> str:
    return json.dumps(_sign(_document(**changes)), indent=2)


def test_independent_canonical_form_matches_and_a_good_manifest_loads(tmp_path: Path) -> None:
    doc = _document(batch_ref="Lieferung Zähler 😀 \x7f\x01 \"q\"")
    assert independent_canonical(doc).encode() == canonical_bytes(doc)
    manifest = _load(tmp_path, json.dumps(_sign(doc), ensure_ascii=False).encode())
    assert (manifest.record_count, manifest.batch_ref) == (6, doc["batch_ref"])


def test_upper_case_unicode_escapes_are_not_the_canonical_form(tmp_path: Path) -> None:
    doc = _document(batch_ref="Zähler")
    with pytest.raises(ManifestError, match="manifest signature does not verify"):
        _load(tmp_path, json.dumps(_sign(doc, upper=True)).encode())


def _raw(text: str) -> Callable[[], bytes]:
    return lambda: text.encode()


NAMED = re.escape(f"manifest {DATA}.manifest.json is not valid UTF-8 JSON")
CASES = [
    pytest.param(lambda: _signed_text().replace('"record_count": 6', '"record_count": NaN')
                 .encode(), NAMED + r" \(NaN is not a JSON number", id="nan"),
    pytest.param(lambda: _signed_text().replace('"record_count": 6', '"record_count": -Infinity')
                 .encode(), NAMED + r" \(-Infinity is not a JSON number", id="infinity"),
    pytest.param(lambda: _signed_text().replace('"record_count": 6', '"record_count": 1e400')
                 .encode(), NAMED + r" \(number out of range", id="float-overflow"),
    pytest.param(lambda: _signed_text().replace('"record_count": 6',
                                                '"record_count": 1' + "0" * 5000).encode(),
                 NAMED + r" \(integer of more than 18 digits", id="huge-integer"),
    pytest.param(lambda: _signed_text(extra=json.loads("[" * 40 + "]" * 40)).encode(),
                 NAMED + r" \(nested deeper than 16 levels", id="deep-nesting"),
    pytest.param(lambda: ("[" * 100_000).encode()[:60_000], NAMED, id="parser-recursion"),
    pytest.param(lambda: _signed_text().replace('"acme-0001"', '"acme-\\ud800"').encode(),
                 NAMED + r" \(a string holds a lone surrogate", id="lone-surrogate"),
    pytest.param(lambda: _signed_text().replace('"vendor": "acme"',
                                                '"vendor": "acme", "vendor": "borealis"').encode(),
                 NAMED + r" \(duplicate name 'vendor'", id="duplicate-name"),
    pytest.param(lambda: _signed_text().encode().replace(b"acme-0001\"", b"acme-\xed\xa0\x80\""),
                 NAMED + r" \(invalid UTF-8 at byte \d+\)", id="invalid-utf8"),
    pytest.param(lambda: b"\xef\xbb\xbf" + _signed_text().encode(),
                 NAMED + r" \(Unexpected UTF-8 BOM", id="byte-order-mark"),
    pytest.param(lambda: b"[1, 2]", re.escape(f"manifest {DATA}.manifest.json is not a JSON "
                                              "object"), id="not-an-object"),
    pytest.param(lambda: _signed_text(record_count=True).encode(),
                 re.escape("manifest field 'record_count' is not an integer"), id="bool-count"),
    pytest.param(lambda: _signed_text(record_count=6.0).encode(),
                 re.escape("manifest field 'record_count' is not an integer"), id="float-count"),
    pytest.param(lambda: _signed_text(record_count=-1).encode(),
                 re.escape("manifest field 'record_count' is not a non-negative integer"),
                 id="negative-count"),
    pytest.param(lambda: _signed_text(record_count=10**9).encode(),
                 re.escape("manifest field 'record_count' is not at most 1000000"),
                 id="count-over-limit"),
    pytest.param(lambda: json.dumps(_sign({k: v for k, v in _document().items()
                                           if k != "created"})).encode(),
                 re.escape("manifest field 'created' is missing"), id="created-missing"),
    pytest.param(lambda: _signed_text(created="yesterday").encode(),
                 re.escape("manifest field 'created' is not an ISO 8601 UTC time"),
                 id="created-not-a-time"),
    pytest.param(lambda: _signed_text(vendor=["acme"]).encode(),
                 re.escape("manifest field 'vendor' is not a string"), id="vendor-a-list"),
    pytest.param(lambda: _signed_text(transport_key="x").encode(),
                 re.escape("manifest field 'transport_key' is not an object"),
                 id="transport-key-not-object"),
    pytest.param(lambda: _signed_text(transport_key={"alg": "RSA-OAEP-SHA256",
                                                     "import_key_sha256": "00" * 32}).encode(),
                 re.escape("manifest field 'transport_key.wrapped' is missing"),
                 id="wrapped-missing"),
    pytest.param(lambda: _signed_text(file_sha256="AB" * 32).encode(),
                 re.escape("manifest field 'file_sha256' is not 64 lower-case hex characters"),
                 id="checksum-upper-case"),
    pytest.param(lambda: _signed_text(batch_ref="x" * 129).encode(),
                 re.escape("manifest field 'batch_ref' is not at most 128 characters"),
                 id="batch-ref-too-long"),
    pytest.param(lambda: _signed_text(file_name="other.csv").encode(),
                 re.escape(f"manifest file_name 'other.csv' is not the delivered file '{DATA}'"),
                 id="file-name-mismatch"),
    pytest.param(lambda: json.dumps({**_document(), "signature": {"alg": ["x"], "value": ""}}
                                    ).encode(),
                 re.escape("manifest field 'signature.alg' is not a string"),
                 id="signature-alg-a-list"),
]


@pytest.mark.parametrize(("build", "reason"), CASES)
def test_malformed_manifest_is_one_manifest_error(tmp_path: Path, build: Callable[[], bytes],
                                                  reason: str) -> None:
    with pytest.raises(ManifestError) as raised:
        _load(tmp_path, build())
    assert raised.value.file == DATA
    assert re.match(reason, raised.value.reason), raised.value.reason
    assert "manifest" in str(raised.value)
