"""The simulated manufacturer and meter: known answers, batch verification, format round trips."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
from cryptography.x509.oid import NameOID
from defusedxml import ElementTree

from lifecycle.errors import ChecksumError, ManifestError
from lifecycle.factory_import.batch_format import (
    KEY_FIELDS,
    SERIAL_RE,
    check_count,
    check_file,
    file_sha256,
    load_manifest,
)
from lifecycle.policy import KeyId
from simulator.manufacturer import (
    REMOVE,
    BatchFiles,
    Manufacturer,
    read_meter_secrets,
    resign_manifest,
)
from simulator.meter import KeyTransferRejected, SimulatedMeter

DATA = Path(__file__).parents[2] / "data"
MAPPINGS = Path(__file__).parents[3] / "simulator" / "mappings"
RFC3394 = json.loads((DATA / "rfc3394.json").read_text())
VECTORS = {v["section"]: v for v in RFC3394["vectors"]}
OAEP = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@pytest.fixture(scope="module")
def import_key() -> rsa.RSAPrivateKey:
    """The DSO's import key pair, in software: enough for the simulator's own tests."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def import_pem(import_key: rsa.RSAPrivateKey) -> str:
    return import_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("manufacturers")


def _batch(keys_dir: Path, out: Path, import_pem: str, vendor: str = "acme",
           **kwargs: Any) -> tuple[Manufacturer, BatchFiles]:
    maker = Manufacturer.create(keys_dir, vendor)
    args: dict[str, Any] = {"oaep_hash": "sha256", "count": 6}
    args.update(kwargs)
    files = maker.make_batch(out=out, mapping_path=MAPPINGS / f"{vendor}.toml",
                             import_public_pem=import_pem, **args)
    return maker, files


def _vendor_rows(path: Path, mapping: dict[str, Any]) -> Iterator[dict[str, str]]:
    """Read a data file back with a general-purpose reader of its format."""
    fmt = mapping["format"]
    if fmt == "csv":
        frame = pd.read_csv(path, sep=mapping["delimiter"], dtype=str, keep_default_na=False,
                            encoding=mapping["encoding"])
        yield from ({str(k): str(v) for k, v in row.items()} for row in frame.to_dict("records"))
    elif fmt == "jsonl":
        with path.open(encoding=mapping["encoding"]) as fh:
            yield from (json.loads(line) for line in fh)
    elif fmt == "xml":
        for element in ElementTree.parse(path).getroot().iter(mapping["record"]):
            row = {f"@{k}": v for k, v in element.attrib.items()}
            row.update({child.tag: child.text or "" for child in element})
            yield row
    else:
        from openpyxl import load_workbook

        book = load_workbook(path, read_only=True)
        rows = book[mapping["sheet"]].iter_rows(values_only=True)
        header = next(rows)
        for values in rows:
            yield {str(h): "" if v is None else str(v) for h, v in zip(header, values, strict=True)}
        book.close()


def _canonical_rows(files: BatchFiles, vendor: str) -> list[dict[str, str]]:
    mapping = tomllib.loads((MAPPINGS / f"{vendor}.toml").read_text())
    decode = mapping.get("values", {})
    out = []
    for row in _vendor_rows(files.data, mapping):
        record = {}
        for field, column in mapping["columns"].items():
            value = str(row[column])
            record[field] = decode.get(field, {}).get(value, value)
        out.append(record)
    return out


def _transport_key(files: BatchFiles, import_key: rsa.RSAPrivateKey, oaep_hash: str) -> bytes:
    document = json.loads(files.manifest.read_text())
    digest = OAEP[oaep_hash]
    return import_key.decrypt(base64.b64decode(document["transport_key"]["wrapped"]),
                              padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(),
                                           label=None))


@pytest.mark.parametrize("section", ["4.3", "4.6"])
def test_batch_key_wrap_matches_rfc3394(section: str, keys_dir: Path, tmp_path: Path,
                                        import_pem: str) -> None:
    # The transport key is AES-256, so the 256-bit-KEK vectors are the ones a batch uses:
    # 4.3 for the AES-128 keys of suites 0/1, 4.6 for the AES-256 keys of suite 2.
    vector = VECTORS[section]
    key = bytes.fromhex(vector["key"])
    _, files = _batch(keys_dir, tmp_path, import_pem, count=1,
                      suites=(0,) if len(key) == 16 else (2,),
                      transport_key=bytes.fromhex(vector["kek"]),
                      key_source=lambda n: (key * 4)[:n] if n == 4 * len(key) else bytes(n))
    (record,) = _canonical_rows(files, "acme")
    assert [record[f] for f in KEY_FIELDS] == [vector["wrapped"]] * 4


def test_gurux_key_wrap_matches_rfc3394() -> None:
    from gurux_dlms.secure import GXDLMSSecureClient

    vector = VECTORS["4.1"]
    wrapped = GXDLMSSecureClient.encrypt(bytes.fromhex(vector["kek"]),
                                         bytes.fromhex(vector["key"]))
    assert bytes(wrapped).hex().upper() == vector["wrapped"]


@pytest.mark.parametrize("oaep_hash", ["sha256", "sha1"])
def test_batch_manifest_verifies_and_keys_unwrap(oaep_hash: str, keys_dir: Path, tmp_path: Path,
                                                 import_pem: str,
                                                 import_key: rsa.RSAPrivateKey) -> None:
    maker, files = _batch(keys_dir, tmp_path, import_pem, oaep_hash=oaep_hash)
    manifest = load_manifest(files.data, maker.signing_public_pem(), import_pem, "acme")
    assert manifest.transport_alg == f"RSA-OAEP-{oaep_hash.upper()}"
    assert check_file(files.data, manifest) == file_sha256(files.data)
    check_count(files.data, manifest, 6)
    transport_key = _transport_key(files, import_key, oaep_hash)
    secrets = list(read_meter_secrets(files.secrets))
    assert [s["serial"] for s in secrets] == [r["serial"] for r in _canonical_rows(files, "acme")]
    for record, secret in zip(_canonical_rows(files, "acme"), secrets, strict=True):
        for field in KEY_FIELDS:
            assert aes_key_unwrap(transport_key, bytes.fromhex(record[field])).hex().upper() \
                == secret[field]


@pytest.mark.parametrize("vendor", ["acme", "borealis", "cygnus", "delta"])
def test_each_format_round_trips(vendor: str, keys_dir: Path, tmp_path: Path, import_pem: str,
                                 import_key: rsa.RSAPrivateKey) -> None:
    maker, files = _batch(keys_dir, tmp_path, import_pem, vendor=vendor)
    manifest = load_manifest(files.data, maker.signing_public_pem(), import_pem, vendor)
    check_file(files.data, manifest)
    records = _canonical_rows(files, vendor)
    check_count(files.data, manifest, len(records))
    transport_key = _transport_key(files, import_key, "sha256")
    secrets = list(read_meter_secrets(files.secrets))
    assert [r["suite"] for r in records] == ["0", "1", "2", "0", "1", "2"]
    for record, secret in zip(records, secrets, strict=True):
        assert SERIAL_RE.fullmatch(record["serial"]) and record["serial"] == secret["serial"]
        assert re.fullmatch(r"[A-Z]{3}", bytes.fromhex(record["system_title"])[:3].decode())
        size = 32 if record["suite"] == "2" else 16
        for field in KEY_FIELDS:
            assert len(record[field]) == 2 * (size + 8)
            key = aes_key_unwrap(transport_key, bytes.fromhex(record[field]))
            assert key.hex().upper() == secret[field]
        _check_certificate(maker, record)


def _check_certificate(maker: Manufacturer, record: dict[str, str]) -> None:
    suite = int(record["suite"])
    if suite == 0:
        assert record["certificate"] == ""
        return
    cert = x509.load_der_x509_certificate(base64.b64decode(record["certificate"]))
    ca = x509.load_pem_x509_certificate(maker.factory_ca_pem(suite).encode())
    cert.verify_directly_issued_by(ca)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA384 if suite == 2 else hashes.SHA256)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == ("secp256r1" if suite == 1 else "secp384r1")
    title = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value
    assert title == record["system_title"]
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365.25
    assert round(years) == 15


def test_serials_and_titles_unique_across_batches(keys_dir: Path, tmp_path: Path,
                                                  import_pem: str) -> None:
    _, first = _batch(keys_dir, tmp_path, import_pem, count=50, serial_start=1)
    _, second = _batch(keys_dir, tmp_path, import_pem, count=50, serial_start=51)
    rows = _canonical_rows(first, "acme") + _canonical_rows(second, "acme")
    assert len({r["serial"] for r in rows}) == len({r["system_title"] for r in rows}) == 100
    certs = {r["certificate"] for r in rows if r["certificate"]}
    assert len(certs) == sum(1 for r in rows if r["suite"] != "0")


def test_seed_makes_keys_reproducible(keys_dir: Path, tmp_path: Path, import_pem: str) -> None:
    _, a = _batch(keys_dir, tmp_path / "a", import_pem, suites=(0,), seed=7)
    _, b = _batch(keys_dir, tmp_path / "b", import_pem, suites=(0,), seed=7)
    assert list(read_meter_secrets(a.secrets)) == list(read_meter_secrets(b.secrets))


@pytest.mark.parametrize(("kwargs", "message"), [
    pytest.param({"sign": False}, "signature is missing", id="unsigned"),
    pytest.param({"manifest_overrides": {"vendor": "borealis"}}, "vendor", id="other-vendor"),
    pytest.param({"manifest_overrides": {"record_count": REMOVE}}, "record_count",
                 id="missing-field"),
    pytest.param({"manifest_overrides": {"signature": {"alg": "ECDSA-P256-SHA256",
                                                       "value": base64.b64encode(b"x").decode()}}},
                 "does not verify", id="bad-signature"),
])
def test_bad_manifests_are_rejected(kwargs: dict[str, Any], message: str, keys_dir: Path,
                                    tmp_path: Path, import_pem: str) -> None:
    maker, files = _batch(keys_dir, tmp_path, import_pem, **kwargs)
    with pytest.raises(ManifestError, match=message):
        load_manifest(files.data, maker.signing_public_pem(), import_pem, "acme")


def test_signed_wrong_count_fails_count_check(keys_dir: Path, tmp_path: Path,
                                              import_pem: str) -> None:
    maker, files = _batch(keys_dir, tmp_path, import_pem,
                          manifest_overrides={"record_count": 7})
    manifest = load_manifest(files.data, maker.signing_public_pem(), import_pem, "acme")
    with pytest.raises(ChecksumError, match="manifest says 7"):
        check_count(files.data, manifest, len(_canonical_rows(files, "acme")))


def test_resign_after_edit_gives_valid_manifest(keys_dir: Path, tmp_path: Path,
                                                import_pem: str) -> None:
    maker, files = _batch(keys_dir, tmp_path, import_pem)
    lines = files.data.read_text().splitlines(keepends=True)
    files.data.write_text("".join(lines + [lines[1]]))  # a duplicate row
    manifest = load_manifest(files.data, maker.signing_public_pem(), import_pem, "acme")
    with pytest.raises(ChecksumError):
        check_file(files.data, manifest)
    resign_manifest(files.manifest, keys_dir, record_count=7)
    manifest = load_manifest(files.data, maker.signing_public_pem(), import_pem, "acme")
    check_file(files.data, manifest)
    check_count(files.data, manifest, len(_canonical_rows(files, "acme")))


def _key_data(entries: list[tuple[int, bytes]]) -> bytes:
    """key_data of global_key_transfer by hand (reference/dlms.md: A-XDR array of structures)."""
    out = bytes([0x01, len(entries)])
    for key_id, wrapped in entries:
        out += bytes([0x02, 0x02, 0x16, key_id, 0x09, len(wrapped)]) + wrapped
    return out


def _meter(kek: bytes, suite: int = 0) -> SimulatedMeter:
    size = len(kek)
    return SimulatedMeter.from_secrets({
        "serial": "ACM0000000001", "system_title": "41434D0000000001", "suite": suite,
        "guek": "AA" * size, "gbek": "BB" * size, "gak": "CC" * size, "kek": kek.hex()})


def test_meter_applies_known_answer_key_data() -> None:
    answer = RFC3394["dlms_key_data"]
    meter = _meter(bytes.fromhex(answer["kek"]))
    key_data = bytes.fromhex(answer["key_data"])
    wrapped = bytes.fromhex(VECTORS["4.1"]["wrapped"])
    assert _key_data([(answer["key_id"], wrapped)]) == key_data
    assert meter.apply_key_transfer(key_data) == [KeyId.GUEK]
    assert meter.key(KeyId.GUEK).hex().upper() == answer["key"]
    assert meter.key(KeyId.GBEK) == bytes.fromhex("BB" * 16)


def test_meter_applies_gurux_global_key_transfer() -> None:
    from gurux_dlms.objects import GXDLMSSecuritySetup
    from gurux_dlms.secure import GXDLMSSecureClient

    answer = RFC3394["dlms_key_data"]
    kek, key = bytes.fromhex(answer["kek"]), bytes.fromhex(answer["key"])
    (frame,) = GXDLMSSecuritySetup().globalKeyTransfer(GXDLMSSecureClient(True), kek, [(0, key)])
    # The action request's parameter is key_data; it ends the frame before FCS and flag.
    assert bytes(frame).hex().upper().endswith(answer["key_data"] + bytes(frame)[-3:].hex().upper())
    meter = _meter(kek)
    meter.apply_key_transfer(bytes.fromhex(answer["key_data"]))
    assert meter.key(KeyId.GUEK) == key


@pytest.mark.parametrize("suite", [0, 2])
def test_meter_rotates_all_keys_under_the_old_master_key(suite: int) -> None:
    size = 32 if suite == 2 else 16
    old_kek, meter = bytes([1]) * size, _meter(bytes([1]) * size, suite)
    new = {k: bytes([0x10 + k]) * size for k in KeyId}
    # Green Book: every key of one transfer is wrapped with the master key held before it.
    meter.apply_key_transfer(_key_data([(k, aes_key_wrap(old_kek, v)) for k, v in new.items()]))
    assert meter.keys == new
    stale = _key_data([(0, aes_key_wrap(old_kek, bytes(size)))])
    with pytest.raises(KeyTransferRejected, match="key wrap check"):
        meter.apply_key_transfer(stale)
    assert meter.keys == new


@pytest.mark.parametrize(("key_data", "message"), [
    pytest.param(lambda kek: _key_data([(0, aes_key_wrap(kek, bytes(32)))]), "needs 128",
                 id="wrong-length"),
    pytest.param(lambda kek: _key_data([(7, aes_key_wrap(kek, bytes(16)))]), "unknown key id",
                 id="unknown-id"),
    pytest.param(lambda kek: _key_data([(0, aes_key_wrap(kek, bytes(16)))] * 2), "twice",
                 id="repeated"),
    pytest.param(lambda kek: _key_data([(0, aes_key_wrap(kek, bytes(16)))])[:-1], "truncated",
                 id="truncated"),
])
def test_meter_rejects_bad_key_data_and_keeps_its_keys(key_data: Any, message: str) -> None:
    kek = bytes(range(16))
    meter = _meter(kek)
    before = dict(meter.keys)
    with pytest.raises(KeyTransferRejected, match=message):
        meter.apply_key_transfer(key_data(kek))
    assert meter.keys == before


def test_simulator_imports_neither_prefect_nor_pkcs11() -> None:
    code = ("import sys, simulator.manufacturer, simulator.meter; "
            "sys.exit(any(m in sys.modules for m in ('prefect', 'pkcs11')))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
