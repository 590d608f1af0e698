"""The canonical factory batch: manifest, record fields and their rules (docs/batch-format.md).

A batch is a data file (any vendor format, mapped onto the canonical fields) and a manifest
``<data file>.manifest.json`` signed by the manufacturer's ECDSA key. The manifest carries the
data file's SHA-256 and record count, and the batch transport key wrapped with RSA-OAEP under
the DSO's import public key for that vendor. Every meter key in the data file is wrapped under
the transport key with AES key wrap (RFC 3394).

Everything here is pure: no HSM, no database, no pandas.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle.errors import ChecksumError, ManifestError
from lifecycle.policy import TRANSPORT_ALGS, KeyId

FORMAT = "meterkeys-batch/1"
MANIFEST_SUFFIX = ".manifest.json"
KEY_FIELDS = tuple(k.field for k in KeyId)
REQUIRED_FIELDS = ("serial", "system_title", "suite", *KEY_FIELDS)
OPTIONAL_FIELDS = ("certificate", "model", "firmware", "manufactured")
CANONICAL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
SERIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
MAX_MANIFEST_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16  # the manifest nests 2 levels; room for ignored extension fields
MAX_JSON_INT_DIGITS = 18  # fits a signed 64-bit integer
# Size limits applied before a data file is parsed (docs/batch-format.md section 2.1).
MAX_RECORDS = 1_000_000
MAX_LINE_CHARS = 256 * 1024  # one CSV or JSON Lines record
MAX_XLSX_UNCOMPRESSED = 1 << 30  # sum of the workbook's zip entries, decompressed
MAX_XLSX_RATIO = 100  # decompressed / compressed, per entry (a zip bomb reaches 1000s)
SIGNATURE_ALGS = {"ECDSA-P256-SHA256": (ec.SECP256R1, hashes.SHA256),
                  "ECDSA-P384-SHA384": (ec.SECP384R1, hashes.SHA384)}


@dataclass(frozen=True)
class Manifest:
    """A verified batch manifest (no secret: the transport key in it is RSA-wrapped)."""

    vendor: str
    batch_ref: str
    file_name: str
    file_sha256: str
    record_count: int
    transport_alg: str
    import_key_sha256: str
    wrapped_transport_key: bytes
    sha256: str = ""  # of the manifest file itself: with the data file's, a delivery's identity

    @property
    def oaep_hash(self) -> str:
        return TRANSPORT_ALGS[self.transport_alg]


def manifest_path(data_file: Path) -> Path:
    """Return where the manifest of a data file lives."""
    return data_file.with_name(data_file.name + MANIFEST_SUFFIX)


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """Return the bytes that the manifest signature covers: the manifest less its signature,
    as JSON with sorted keys, no whitespace, ASCII only."""
    body = {k: v for k, v in document.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def source_digest(wrapped_key: bytes) -> str:
    """Return the digest by which a vendor's wrapped key is recognised when delivered again.

    The first 128 bits of SHA-256 of the ciphertext (RFC 3394 output under the transport
    key): a digest of ciphertext, no key material. AES key wrap is deterministic, so the same
    key wrapped under the same transport key gives the same digest.
    """
    return hashlib.sha256(wrapped_key).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    """Return the SHA-256 of a file, read in blocks (memory stays flat)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def spki_sha256(public_pem: str | bytes) -> str:
    """Return the SHA-256 of a public key's SubjectPublicKeyInfo DER (its fingerprint)."""
    key = serialization.load_pem_public_key(
        public_pem.encode() if isinstance(public_pem, str) else public_pem)
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def load_manifest(data_file: Path, signing_key_pem: str, import_key_pem: str,
                  vendor: str) -> Manifest:
    """Read, check and verify the manifest of a data file.

    Every way a manifest can be unacceptable ends here as a ``ManifestError`` naming it:
    bytes that are not UTF-8, JSON that is malformed or that RFC 8259 leaves open (duplicate
    names, non-finite or huge numbers, deep nesting, lone surrogates), a field missing or of
    the wrong JSON type (section 5 of docs/batch-format.md), a signature that does not verify.

    Raises:
        ManifestError: missing, unparsable, incomplete, for another vendor, file or import
            key, or its signature does not verify under the manufacturer's key.
    """
    path = manifest_path(data_file)
    name = data_file.name
    if not path.exists():
        raise ManifestError(name, f"manifest {path.name} is missing")
    raw = path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(name, f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        document = strict_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(name, f"manifest {path.name} is not valid UTF-8 JSON "
                                  f"(invalid UTF-8 at byte {exc.start})") from None
    except JsonRefused as exc:
        raise ManifestError(name, f"manifest {path.name} is not valid UTF-8 JSON ({exc})"
                            ) from None
    if not isinstance(document, dict):
        raise ManifestError(name, f"manifest {path.name} is not a JSON object")
    _check_fields(name, document)
    _verify_signature(name, document, signing_key_pem)
    manifest = dataclasses.replace(_parse(name, document), sha256=hashlib.sha256(raw).hexdigest())
    if manifest.vendor != vendor:
        raise ManifestError(name, f"manifest is for vendor {manifest.vendor!r}, not {vendor!r}")
    if manifest.file_name != name:
        raise ManifestError(name, f"manifest file_name {manifest.file_name!r} is not the "
                                  f"delivered file {name!r}")
    if manifest.import_key_sha256 != spki_sha256(import_key_pem):
        raise ManifestError(name, "transport key is wrapped for another import key "
                                  "(import_key_sha256 does not match this vendor's)")
    return manifest


# --- strict JSON (RFC 8259 leaves these to the parser; the format does not) -------------------
class JsonRefused(ValueError):
    """A JSON text that is malformed, or well-formed but outside what the format allows."""

    def __init__(self, reason: str, where: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason} at {where}" if where else reason)


def strict_json(text: str) -> Any:
    """Parse JSON refusing what RFC 8259 allows parsers to accept or leaves undefined.

    Refused: syntax errors; a byte-order mark (RFC 8259 §8.1: not to be added); duplicate
    object names (§4: "names SHOULD be unique", behaviour then unpredictable); NaN and
    Infinity (not JSON, §6) and numbers that overflow a double; integers of more than
    ``MAX_JSON_INT_DIGITS`` digits (§6: beyond interoperable precision); nesting deeper than
    ``MAX_JSON_DEPTH``; strings holding a lone UTF-16 surrogate (§8.2: not Unicode).

    Raises:
        JsonRefused: the text is not acceptable, naming why (no value of the text).
    """
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int,
                           parse_float=_finite_float, object_pairs_hook=_unique_names)
    except json.JSONDecodeError as exc:
        raise JsonRefused(exc.msg, f"line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise JsonRefused(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_tree(value)
    return value


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise JsonRefused(f"integer of more than {MAX_JSON_INT_DIGITS} digits")
    return int(digits)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused("number out of range")
    return value


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonRefused(f"duplicate name {_printable(key)!r}")
        out[key] = value
    return out


def _check_tree(root: Any) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_unicode(value)
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise JsonRefused(f"nested deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_unicode(key)
                stack.append((item, depth + 1))


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRefused("a string holds a lone surrogate (\\ud800-\\udfff), not Unicode"
                          ) from None


def _printable(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode()[:40]


# --- fields -----------------------------------------------------------------------------------
# Section 5: every field, its JSON type and its rule. JSON booleans are not integers here
# (Python's bool is an int subclass: the type is compared exactly).
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CREATED = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_TOP_FIELDS: dict[str, type] = {"format": str, "vendor": str, "batch_ref": str, "file_name": str,
                                "file_sha256": str, "record_count": int, "created": str,
                                "transport_key": dict, "signature": dict}
_TRANSPORT_FIELDS: dict[str, type] = {"alg": str, "import_key_sha256": str, "wrapped": str}
_SIGNATURE_FIELDS: dict[str, type] = {"alg": str, "value": str}
_JSON_TYPE = {str: "a string", int: "an integer", dict: "an object"}


def _check_fields(name: str, doc: dict[str, Any]) -> None:
    if "signature" not in doc:
        raise ManifestError(name, "manifest signature is missing")
    _check_types(name, doc, _TOP_FIELDS, "")
    _check_types(name, doc["transport_key"], _TRANSPORT_FIELDS, "transport_key.")
    _check_types(name, doc["signature"], _SIGNATURE_FIELDS, "signature.")
    rules = [("record_count", doc["record_count"] >= 0, "a non-negative integer"),
             ("record_count", doc["record_count"] <= MAX_RECORDS,
              f"at most {MAX_RECORDS} (records per batch)"),
             ("batch_ref", len(doc["batch_ref"]) <= 128, "at most 128 characters"),
             ("file_sha256", bool(_HEX64.fullmatch(doc["file_sha256"])),
              "64 lower-case hex characters"),
             ("transport_key.import_key_sha256",
              bool(_HEX64.fullmatch(doc["transport_key"]["import_key_sha256"])),
              "64 lower-case hex characters"),
             ("created", _is_utc_time(doc["created"]), "an ISO 8601 UTC time (...T...Z)")]
    for field, ok, want in rules:
        if not ok:
            raise ManifestError(name, f"manifest field {field!r} is not {want}")


def _check_types(name: str, obj: dict[str, Any], fields: dict[str, type], prefix: str) -> None:
    for field, kind in fields.items():
        if field not in obj:
            raise ManifestError(name, f"manifest field {prefix + field!r} is missing")
        if type(obj[field]) is not kind:
            raise ManifestError(name, f"manifest field {prefix + field!r} is not "
                                      f"{_JSON_TYPE[kind]}")


def _is_utc_time(text: str) -> bool:
    if not _CREATED.fullmatch(text):
        return False
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _verify_signature(name: str, document: dict[str, Any], signing_key_pem: str) -> None:
    signature = document["signature"]
    alg = signature["alg"]
    if alg not in SIGNATURE_ALGS:
        raise ManifestError(name, f"manifest signature algorithm {_printable(alg)!r} is not "
                                  "accepted")
    curve, digest = SIGNATURE_ALGS[alg]
    public = serialization.load_pem_public_key(signing_key_pem.encode())
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, curve):
        raise ManifestError(name, f"manifest signature {alg} does not match the vendor's key")
    try:
        value = base64.b64decode(signature["value"], validate=True)
        public.verify(value, canonical_bytes(document), ec.ECDSA(digest()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise ManifestError(name, "manifest signature does not verify") from None


def _parse(name: str, doc: dict[str, Any]) -> Manifest:
    # Types and shapes were checked by ``_check_fields``; here the values' meaning.
    if doc["format"] != FORMAT:
        raise ManifestError(name, f"manifest format {_printable(doc['format'])!r} is not "
                                  f"{FORMAT}")
    transport = doc["transport_key"]
    alg = transport["alg"]
    if alg not in TRANSPORT_ALGS:
        raise ManifestError(name, f"transport key algorithm {_printable(alg)!r} is not accepted")
    try:
        wrapped = base64.b64decode(transport["wrapped"], validate=True)
    except (binascii.Error, ValueError):
        raise ManifestError(name, "manifest field 'transport_key.wrapped' is not base64"
                            ) from None
    return Manifest(
        vendor=doc["vendor"], batch_ref=doc["batch_ref"], file_name=doc["file_name"],
        file_sha256=doc["file_sha256"], record_count=doc["record_count"], transport_alg=alg,
        import_key_sha256=transport["import_key_sha256"], wrapped_transport_key=wrapped)


def check_file(data_file: Path, manifest: Manifest) -> str:
    """Check the data file against the manifest's checksum; return the checksum.

    Raises:
        ChecksumError: the file's SHA-256 differs from the manifest's.
    """
    actual = file_sha256(data_file)
    if actual != manifest.file_sha256:
        raise ChecksumError(data_file.name, "SHA-256 of the file does not match the manifest "
                                            "(truncated or altered file)")
    return actual


def check_count(data_file: Path, manifest: Manifest, rows: int) -> None:
    """Check the number of records read against the manifest.

    Raises:
        ChecksumError: the counts differ.
    """
    if rows != manifest.record_count:
        raise ChecksumError(data_file.name, f"file holds {rows} records, manifest says "
                                            f"{manifest.record_count}")
