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
import re
from dataclasses import dataclass
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

    Raises:
        ManifestError: missing, unparsable, incomplete, for another vendor or import key,
            or its signature does not verify under the manufacturer's key.
    """
    path = manifest_path(data_file)
    name = data_file.name
    if not path.exists():
        raise ManifestError(name, f"manifest {path.name} is missing")
    raw = path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(name, f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(name, f"manifest is not valid UTF-8 JSON ({exc.__class__.__name__})"
                            ) from None
    if not isinstance(document, dict):
        raise ManifestError(name, "manifest is not a JSON object")
    _verify_signature(name, document, signing_key_pem)
    manifest = dataclasses.replace(_parse(name, document), sha256=hashlib.sha256(raw).hexdigest())
    if manifest.vendor != vendor:
        raise ManifestError(name, f"manifest is for vendor {manifest.vendor!r}, not {vendor!r}")
    if manifest.import_key_sha256 != spki_sha256(import_key_pem):
        raise ManifestError(name, "transport key is wrapped for another import key "
                                  "(import_key_sha256 does not match this vendor's)")
    return manifest


def _verify_signature(name: str, document: dict[str, Any], signing_key_pem: str) -> None:
    signature = document.get("signature")
    if not isinstance(signature, dict) or "value" not in signature or "alg" not in signature:
        raise ManifestError(name, "manifest signature is missing")
    alg = signature["alg"]
    if alg not in SIGNATURE_ALGS:
        raise ManifestError(name, f"manifest signature algorithm {alg!r} is not accepted")
    curve, digest = SIGNATURE_ALGS[alg]
    public = serialization.load_pem_public_key(signing_key_pem.encode())
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, curve):
        raise ManifestError(name, f"manifest signature {alg} does not match the vendor's key")
    try:
        value = base64.b64decode(str(signature["value"]), validate=True)
        public.verify(value, canonical_bytes(document), ec.ECDSA(digest()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise ManifestError(name, "manifest signature does not verify") from None


def _parse(name: str, doc: dict[str, Any]) -> Manifest:
    try:
        if doc["format"] != FORMAT:
            raise ManifestError(name, f"manifest format {doc['format']!r} is not {FORMAT}")
        transport = doc["transport_key"]
        alg = transport["alg"]
        if alg not in TRANSPORT_ALGS:
            raise ManifestError(name, f"transport key algorithm {alg!r} is not accepted")
        count = doc["record_count"]
        if not isinstance(count, int) or count < 0:
            raise ManifestError(name, "manifest record_count is not a non-negative integer")
        return Manifest(
            vendor=str(doc["vendor"]), batch_ref=str(doc["batch_ref"])[:128],
            file_name=str(doc["file_name"]), file_sha256=str(doc["file_sha256"]).lower(),
            record_count=count, transport_alg=alg,
            import_key_sha256=str(transport["import_key_sha256"]).lower(),
            wrapped_transport_key=base64.b64decode(str(transport["wrapped"]), validate=True))
    except KeyError as exc:
        raise ManifestError(name, f"manifest field {exc.args[0]!r} is missing") from None
    except (TypeError, binascii.Error):
        raise ManifestError(name, "manifest transport_key is malformed") from None


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
