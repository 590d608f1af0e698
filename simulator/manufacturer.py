"""A simulated meter manufacturer: signing key, factory CAs and factory batches.

It writes batches in the canonical format of ``docs/batch-format.md``: a data file in a vendor's
own layout (described by a mapping file in ``simulator/mappings/``), its signed manifest, and,
for the simulated meters only, ``<data file>.meter-secrets.jsonl`` with the plaintext keys each
meter holds. Generation streams: rows are written as they are made, so a batch of a million
meters needs no more memory than a batch of ten.

This is test and demo code; its keys live in PEM files in the manufacturer's directory (0700,
files 0600), and the meter-secrets files are 0600. Both stand for other organisations' secrets:
they belong in the simulation directory (``Settings.simulation_dir``), never under the DSO's
``METERKEYS_HOME``. It never imports prefect or pkcs11.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import os
import random
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from xml.sax.saxutils import escape, quoteattr

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.x509.oid import NameOID

from lifecycle.factory_import.batch_format import (
    CANONICAL_FIELDS,
    FORMAT,
    KEY_FIELDS,
    MANIFEST_SUFFIX,
    REQUIRED_FIELDS,
    SIGNATURE_ALGS,
    canonical_bytes,
    file_sha256,
    manifest_path,
    spki_sha256,
)
from lifecycle.policy import OAEP_HASHES, SUITES, TRANSPORT_ALGS

SECRETS_SUFFIX = ".meter-secrets.jsonl"
FORMATS = {"csv": ".csv", "jsonl": ".jsonl", "xml": ".xml", "xlsx": ".xlsx"}
CURVES: dict[str, tuple[type[ec.EllipticCurve], str]] = {
    "P-256": (ec.SECP256R1, "ECDSA-P256-SHA256"),
    "P-384": (ec.SECP384R1, "ECDSA-P384-SHA384"),
}
# Suite 1 certificates use P-256/SHA-256, suite 2 P-384/SHA-384 (DLMS Green Book, security
# suites): each suite has its own factory CA on the suite's curve.
CA_CURVES = {1: "P-256", 2: "P-384"}
CERT_VALIDITY = dt.timedelta(days=round(365.25 * 15))  # meter certificates: 15 years
REMOVE: Any = object()
"""Value for ``manifest_overrides`` that deletes a manifest field (to test missing fields)."""

TRANSPORT_ALG_OF = {hash_name: alg for alg, hash_name in TRANSPORT_ALGS.items()}
RandBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class BatchFiles:
    """The files of one generated batch."""

    data: Path
    manifest: Path
    secrets: Path
    count: int


@dataclass(frozen=True)
class VendorMapping:
    """The parts of a vendor mapping file (TOML, docs/batch-format.md) that a writer needs."""

    vendor: str
    format: str
    encoding: str
    delimiter: str
    record: str
    sheet: str
    columns: dict[str, str]  # canonical field -> vendor column
    encode: dict[str, dict[str, str]]  # canonical field -> canonical value -> vendor value

    @classmethod
    def load(cls, path: Path) -> VendorMapping:
        """Read a mapping file.

        Raises:
            ValueError: unknown format or field, or a required field has no column.
        """
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        fmt = str(doc.get("format", ""))
        if fmt not in FORMATS:
            raise ValueError(f"{path.name}: format {fmt!r} is not one of {sorted(FORMATS)}")
        columns = {str(k): str(v) for k, v in doc.get("columns", {}).items()}
        unknown = set(columns) - set(CANONICAL_FIELDS)
        missing = set(REQUIRED_FIELDS) - set(columns)
        if unknown or missing:
            raise ValueError(f"{path.name}: unknown fields {sorted(unknown)}, "
                             f"required fields without a column {sorted(missing)}")
        encode: dict[str, dict[str, str]] = {}
        for field, table in doc.get("values", {}).items():
            inverse: dict[str, str] = {}
            for vendor_value, canonical in table.items():
                inverse.setdefault(str(canonical), str(vendor_value))
            encode[str(field)] = inverse
        return cls(vendor=str(doc["vendor"]), format=fmt,
                   encoding=str(doc.get("encoding", "utf-8")),
                   delimiter=str(doc.get("delimiter", ",")), record=str(doc.get("record", "")),
                   sheet=str(doc.get("sheet", "Sheet1")), columns=columns, encode=encode)

    def vendor_row(self, record: Mapping[str, str]) -> dict[str, str]:
        """Return a canonical record under the vendor's column names and values."""
        row = {}
        for field, column in self.columns.items():
            value = record.get(field, "")
            row[column] = self.encode.get(field, {}).get(value, value)
        return row


class _RowWriter(Protocol):
    def write(self, row: dict[str, str]) -> None: ...

    def close(self) -> None: ...


class _CsvWriter:
    def __init__(self, path: Path, mapping: VendorMapping) -> None:
        self._fh = path.open("w", encoding=mapping.encoding, newline="")
        self._csv = csv.writer(self._fh, delimiter=mapping.delimiter)
        self._csv.writerow(mapping.columns.values())

    def write(self, row: dict[str, str]) -> None:
        self._csv.writerow(row.values())

    def close(self) -> None:
        self._fh.close()


class _JsonlWriter:
    def __init__(self, path: Path, mapping: VendorMapping) -> None:
        self._fh = path.open("w", encoding=mapping.encoding, newline="\n")

    def write(self, row: dict[str, str]) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._fh.close()


class _XmlWriter:
    """Write records one element at a time; fields named "@x" become attributes."""

    def __init__(self, path: Path, mapping: VendorMapping) -> None:
        if not mapping.record:
            raise ValueError("an xml mapping needs `record` (the record element name)")
        self._record = mapping.record
        self._fh = path.open("w", encoding=mapping.encoding, newline="\n")
        self._fh.write(f'<?xml version="1.0" encoding="{mapping.encoding}"?>\n'
                       f"<{self._record}s>\n")

    def write(self, row: dict[str, str]) -> None:
        attrs = "".join(f" {k[1:]}={quoteattr(v)}" for k, v in row.items() if k.startswith("@"))
        children = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in row.items()
                           if not k.startswith("@"))
        self._fh.write(f"  <{self._record}{attrs}>{children}</{self._record}>\n")

    def close(self) -> None:
        self._fh.write(f"</{self._record}s>\n")
        self._fh.close()


class _XlsxWriter:
    """openpyxl write-only mode streams rows to a temporary file: memory stays flat."""

    def __init__(self, path: Path, mapping: VendorMapping) -> None:
        from openpyxl import Workbook

        self._path = path
        self._book = Workbook(write_only=True)
        self._sheet = self._book.create_sheet(mapping.sheet)
        self._sheet.append(list(mapping.columns.values()))

    def write(self, row: dict[str, str]) -> None:
        self._sheet.append(list(row.values()))

    def close(self) -> None:
        self._book.save(self._path)


_WRITERS: dict[str, Callable[[Path, VendorMapping], _RowWriter]] = {
    "csv": _CsvWriter, "jsonl": _JsonlWriter, "xml": _XmlWriter, "xlsx": _XlsxWriter}


class _Files:
    """Open the data and secrets writers together; close both, also on error."""

    def __init__(self, data: Path, secrets: Path, mapping: VendorMapping) -> None:
        self.data = _WRITERS[mapping.format](data, mapping)
        self.secrets = os.fdopen(os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                 "w", encoding="utf-8", newline="\n")

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.data.close()
        self.secrets.close()


def manufacturer_id(vendor: str) -> str:
    """Return the 3-letter manufacturer id of a vendor (DLMS FLAG id: 3 upper-case letters)."""
    letters = re.sub(r"[^A-Za-z]", "", vendor).upper()
    return (letters + "XXX")[:3]


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path.name} is not an EC private key")
    return key


def _load_or_make_key(path: Path, curve: str) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        return _load_key(path)
    key = ec.generate_private_key(CURVES[curve][0]())
    # Created 0600, never written world-readable first.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return key


def _ec_hash(key: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384:
    return hashes.SHA384() if key.curve.key_size > 256 else hashes.SHA256()


def _signature_alg(key: ec.EllipticCurvePrivateKey) -> str:
    for alg, (curve, _) in SIGNATURE_ALGS.items():
        if isinstance(key.curve, curve):
            return alg
    raise ValueError(f"curve {key.curve.name} has no manifest signature algorithm")


def _sign_manifest(document: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> None:
    """Sign the canonical bytes of the manifest (lifecycle.batch.canonical_bytes)."""
    value = key.sign(canonical_bytes(document), ec.ECDSA(_ec_hash(key)))
    document["signature"] = {"alg": _signature_alg(key),
                             "value": base64.b64encode(value).decode()}


def _write_manifest(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _signing_key_path(directory: Path, vendor: str) -> Path:
    return directory / f"{vendor}.signing-key.pem"


def resign_manifest(manifest: Path, signing_key_dir: Path, *, vendor: str | None = None,
                    record_count: int | None = None) -> None:
    """Recompute a manifest's file_sha256 (and record_count if given) and sign it again.

    For tests that edit a data file and need a validly signed batch with bad content. The
    signing key is the one ``Manufacturer.create`` keeps in ``signing_key_dir`` for ``vendor``
    (default: the manifest's own vendor field).
    """
    document = json.loads(manifest.read_text(encoding="utf-8"))
    data = manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX))
    document["file_sha256"] = file_sha256(data)
    if record_count is not None:
        document["record_count"] = record_count
    key = _load_key(_signing_key_path(signing_key_dir, vendor or document["vendor"]))
    document.pop("signature", None)
    _sign_manifest(document, key)
    _write_manifest(manifest, document)


def read_meter_secrets(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the meter-secrets records of a batch, one per meter, in file order.

    Each has ``serial``, ``system_title`` (hex), ``suite`` (int) and the plaintext keys
    ``guek``, ``gbek``, ``gak``, ``kek`` (hex). Only simulator code may read these files.
    """
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def wrap_transport_key(transport_key: bytes, import_public_pem: str, oaep_hash: str) -> bytes:
    """Wrap the batch transport key with RSA-OAEP (MGF1 with the same hash, RFC 8017 §7.1).

    Raises:
        ValueError: ``oaep_hash`` is not "sha256" or "sha1", or the key is not RSA.
    """
    if oaep_hash not in OAEP_HASHES:
        raise ValueError(f"oaep_hash {oaep_hash!r} is not one of {sorted(OAEP_HASHES)}")
    public = serialization.load_pem_public_key(import_public_pem.encode())
    if not isinstance(public, rsa.RSAPublicKey):
        raise ValueError("the import public key is not an RSA key")
    digest = OAEP_HASHES[oaep_hash]
    return public.encrypt(transport_key, padding.OAEP(mgf=padding.MGF1(digest()),
                                                      algorithm=digest(), label=None))


class _FactoryCa:
    """A self-signed EC root that issues meter certificates for one suite."""

    def __init__(self, directory: Path, vendor: str, suite: int) -> None:
        curve = CA_CURVES[suite]
        stem = f"{vendor}.factory-ca-suite{suite}"
        self.key = _load_or_make_key(directory / f"{stem}.key.pem", curve)
        cert_path = directory / f"{stem}.pem"
        if cert_path.exists():
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            self.cert = self._self_sign(vendor, suite)
            cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.hash = _ec_hash(self.key)
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())

    def _self_sign(self, vendor: str, suite: int) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, vendor),
                          x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"{vendor} factory CA suite {suite}")])
        now = dt.datetime.now(dt.UTC)
        public = self.key.public_key()
        return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=365 * 30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .sign(self.key, _ec_hash(self.key)))

    def issue(self, meter_public: ec.EllipticCurvePublicKey, vendor: str, serial: str,
              system_title: str, made: dt.datetime) -> bytes:
        """Issue a meter's factory certificate; return it as DER.

        The subject's serialNumber is the system title in hex, as the DLMS Green Book
        (IEC 62056-5-3, certificate subject) identifies a server by its system title.
        """
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, vendor),
                             x509.NameAttribute(NameOID.COMMON_NAME, serial),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, system_title)])
        # One certificate for both digital signature and key agreement keeps the simulator
        # small; real meters may carry one certificate per usage (Green Book 9.2.6).
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(meter_public).serial_number(x509.random_serial_number())
                .not_valid_before(made).not_valid_after(made + CERT_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, True, False, False,
                                             False, False), critical=True)
                .add_extension(self._aki, critical=False)
                .sign(self.key, self.hash))
        return cert.public_bytes(serialization.Encoding.DER)


class Manufacturer:
    """A simulated manufacturer: its manifest signing key and its factory CAs."""

    def __init__(self, directory: Path, vendor: str, signing_key: ec.EllipticCurvePrivateKey,
                 cas: dict[int, _FactoryCa]) -> None:
        self.directory = directory
        self.vendor = vendor
        self.manufacturer_id = manufacturer_id(vendor)
        self._signing_key = signing_key
        self._cas = cas

    @classmethod
    def create(cls, directory: Path, vendor: str, curve: str = "P-256") -> Manufacturer:
        """Make, or load if present in ``directory``, the vendor's signing key and factory CAs.

        Raises:
            ValueError: unknown curve, or the stored signing key is on another curve.
        """
        if curve not in CURVES:
            raise ValueError(f"curve {curve!r} is not one of {sorted(CURVES)}")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = _load_or_make_key(_signing_key_path(directory, vendor), curve)
        if not isinstance(key.curve, CURVES[curve][0]):
            raise ValueError(f"{vendor}: stored signing key is on {key.curve.name}, not {curve}")
        cas = {suite: _FactoryCa(directory, vendor, suite) for suite in CA_CURVES}
        return cls(directory, vendor, key, cas)

    def signing_public_pem(self) -> str:
        """Return the manifest signing public key (what the DSO registers for this vendor)."""
        return self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def factory_ca_pem(self, suite: int) -> str:
        """Return the factory root CA certificate (PEM) that issues suite 1 or 2 meter certs."""
        return self._cas[suite].cert.public_bytes(serialization.Encoding.PEM).decode()

    def resign(self, manifest: Path, record_count: int | None = None) -> None:
        """Recompute file_sha256 (and record_count if given) and re-sign; see resign_manifest."""
        resign_manifest(manifest, self.directory, vendor=self.vendor, record_count=record_count)

    def make_batch(self, *, out: Path, mapping_path: Path, import_public_pem: str,
                   oaep_hash: str, count: int, suites: Sequence[int] = (0, 1, 2),
                   serial_start: int = 1, batch_ref: str | None = None,
                   seed: int | None = None, manifest_overrides: dict[str, Any] | None = None,
                   sign: bool = True, key_source: RandBytes | None = None,
                   transport_key: bytes | None = None) -> BatchFiles:
        """Write a batch of ``count`` meters into the directory ``out``.

        Files: ``<batch_ref>.<csv|jsonl|xml|xlsx>`` (batch_ref defaults to
        ``<vendor>-<serial_start>-<count>``), its manifest and its meter-secrets file.
        Serials are ``<manufacturer id><number, 10 digits>`` from ``serial_start`` on.
        Suites go round robin over ``suites``. ``seed`` makes the keys reproducible (tests
        only; otherwise they come from os.urandom). ``manifest_overrides`` replaces manifest
        fields before signing (``REMOVE`` deletes one; a "signature" override replaces the
        signature after signing); ``sign=False`` leaves the signature out. ``key_source``
        (n -> n bytes) and ``transport_key`` fix the key material, for known-answer tests and
        the documentation's worked example only.

        Raises:
            ValueError: bad mapping, suite, count, serial range or oaep_hash.
        """
        if count < 0 or serial_start < 0 or serial_start + count > 1 << 40:
            raise ValueError("serial numbers must fit the 5-byte system title number")
        if not suites or any(s not in SUITES for s in suites):
            raise ValueError(f"suites {list(suites)} must be a non-empty subset of {set(SUITES)}")
        rand: RandBytes = key_source or (
            random.Random(seed).randbytes if seed is not None else os.urandom)
        if transport_key is not None and len(transport_key) != 32:
            raise ValueError("the transport key is AES-256: 32 bytes")
        return self._write(out=out, mapping_path=mapping_path,
                           import_public_pem=import_public_pem, oaep_hash=oaep_hash,
                           count=count, suites=tuple(suites), serial_start=serial_start,
                           batch_ref=batch_ref, rand=rand,
                           transport_key=transport_key or rand(32),
                           overrides=manifest_overrides or {}, sign=sign)

    def _write(self, *, out: Path, mapping_path: Path, import_public_pem: str, oaep_hash: str,
               count: int, suites: tuple[int, ...], serial_start: int, batch_ref: str | None,
               rand: RandBytes, transport_key: bytes, overrides: dict[str, Any],
               sign: bool) -> BatchFiles:
        mapping = VendorMapping.load(mapping_path)
        # Wrap first: a bad import key or hash fails before any file is written.
        wrapped_tk = wrap_transport_key(transport_key, import_public_pem, oaep_hash)
        ref = batch_ref or f"{self.vendor}-{serial_start:010d}-{count}"
        out.mkdir(parents=True, exist_ok=True)
        data = out / f"{ref}{FORMATS[mapping.format]}"
        secrets = data.with_name(data.name + SECRETS_SUFFIX)
        meter_keys = {s: ec.derive_private_key(int.from_bytes(rand(32)) % (1 << 200) + 1,
                                               CURVES[CA_CURVES[s]][0]()).public_key()
                      for s in suites if s in CA_CURVES}
        made = dt.datetime.now(dt.UTC).replace(microsecond=0)
        with _Files(data, secrets, mapping) as files:
            for i in range(count):
                record, secret = self._meter(serial_start + i, suites[i % len(suites)],
                                             transport_key, rand, meter_keys, made)
                files.data.write(mapping.vendor_row(record))
                files.secrets.write(json.dumps(secret) + "\n")
        document: dict[str, Any] = {
            "format": FORMAT, "vendor": self.vendor, "batch_ref": ref, "file_name": data.name,
            "file_sha256": file_sha256(data), "record_count": count,
            "created": made.isoformat().replace("+00:00", "Z"),
            "transport_key": {"alg": TRANSPORT_ALG_OF[oaep_hash],
                              "import_key_sha256": spki_sha256(import_public_pem),
                              "wrapped": base64.b64encode(wrapped_tk).decode()}}
        self._finish_manifest(document, overrides, sign)
        manifest = manifest_path(data)
        _write_manifest(manifest, document)
        return BatchFiles(data=data, manifest=manifest, secrets=secrets, count=count)

    def _finish_manifest(self, document: dict[str, Any], overrides: dict[str, Any],
                         sign: bool) -> None:
        for name, value in overrides.items():
            if name == "signature":
                continue
            if value is REMOVE:
                document.pop(name, None)
            else:
                document[name] = value
        if sign:
            _sign_manifest(document, self._signing_key)
        if "signature" in overrides:
            if overrides["signature"] is REMOVE:
                document.pop("signature", None)
            else:
                document["signature"] = overrides["signature"]

    def _meter(self, number: int, suite: int, transport_key: bytes, rand: RandBytes,
               meter_keys: dict[int, ec.EllipticCurvePublicKey],
               made: dt.datetime) -> tuple[dict[str, str], dict[str, Any]]:
        """Return one meter's canonical record and its secrets record."""
        serial = f"{self.manufacturer_id}{number:010d}"
        # DLMS Green Book 4.3.4: system title = 3-byte manufacturer (FLAG) id + 5-byte number.
        title = (self.manufacturer_id.encode("ascii") + number.to_bytes(5, "big")).hex().upper()
        size = SUITES[suite].key_bits // 8
        material = rand(4 * size)
        record = {"serial": serial, "system_title": title, "suite": str(suite),
                  "certificate": "", "model": f"{self.manufacturer_id}-E{suite}00",
                  "firmware": "1.4.2", "manufactured": made.date().isoformat()}
        secret: dict[str, Any] = {"serial": serial, "system_title": title, "suite": suite}
        for n, field in enumerate(KEY_FIELDS):
            key = material[n * size:(n + 1) * size]
            # RFC 3394 AES key wrap under the batch transport key (AES-256).
            record[field] = aes_key_wrap(transport_key, key).hex().upper()
            secret[field] = key.hex().upper()
        if suite in meter_keys:
            der = self._cas[suite].issue(meter_keys[suite], self.vendor, serial, title, made)
            record["certificate"] = base64.b64encode(der).decode()
        return record, secret
