"""A corpus of malformed factory batches: each asserts the exact error, and that nothing else
of the batch was lost (every good row imported) or half-written (no meter, key or batch of a
rejected file; no key of a quarantined row).

Every bad batch is made from a good generated one: the data file is edited and the manifest
re-signed with the manufacturer's key ("validly signed, bad content"), or the manifest itself
is edited (the cases about the manifest).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from lifecycle.audit import trail
from lifecycle.factory_import import steps as intake
from lifecycle.factory_import.batch_format import spki_sha256
from lifecycle.inventory import db
from lifecycle.inventory.batches import BatchStatus, ImportBatch
from lifecycle.inventory.meters import KeyVersion, Meter
from simulator.manufacturer import (
    BatchFiles,
    read_meter_secrets,
    resign_manifest,
    wrap_transport_key,
)

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

COUNT = 30  # meters per generated batch; suites round robin 0, 1, 2 (row 1 S0, row 2 S1, ...)

# Quarantine reasons, written out (not imported from the product): they are the contract.
NOT_HEX = "missing or not hex"
BAD_LENGTH = "wrapped key length does not match the suite"
KW_FAILED = "key-wrap integrity check failed (tampered, or wrapped under another transport key)"
BAD_SERIAL = "not 1-32 letters, digits, '.', '_', '-'"
BAD_TITLE = "not 16 hex characters (8 bytes)"
BAD_SUITE = "unknown suite (expected 0, 1 or 2)"
NO_CERT = "missing for suite 1 or 2"
FORMULA = "starts with a formula character"
CONTROL = "holds control characters"


@dataclass
class Case:
    """A prepared bad batch and what the import must make of it."""

    files: BatchFiles
    vendor: str
    error: str | None = None  # regex of the reason after "<file name>: " (whole-file rejection)
    quarantined: list[tuple[int, str, str, str]] = field(default_factory=list)  # row, field,
    # reason, serial as reported ("" when the serial itself is not a valid serial)
    plaintext: set[str] = field(default_factory=set)  # key material the messages must not hold


Builder = Callable[[Any, Path, int], Case]


# --- file helpers -------------------------------------------------------------------------------
def _serial(vendor: str, number: int) -> str:
    return f"{vendor[:3].upper()}{number:010d}"


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    return rows[0], rows[1:]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter=";")
        writer.writerow(header)
        writer.writerows(rows)


def _acme(fleet: Any, out: Path, start: int,
          edit: Callable[[list[str], list[list[str]]], None] | None = None,
          **kwargs: Any) -> BatchFiles:
    """A good acme CSV batch of COUNT meters, edited in place by ``edit(header, rows)`` and
    re-signed (rows are 0-based here; record numbers in the file are 1-based)."""
    files = fleet.batch("acme", out, COUNT, serial_start=start, seed=start, **kwargs)
    if edit is not None:
        header, rows = _read_csv(files.data)
        edit(header, rows)
        _write_csv(files.data, header, rows)
        fleet.makers["acme"].resign(files.manifest)
    return files


def _set(header: list[str], rows: list[list[str]], record: int, column: str, value: str) -> None:
    rows[record - 1][header.index(column)] = value


def _get(header: list[str], rows: list[list[str]], record: int, column: str) -> str:
    return rows[record - 1][header.index(column)]


def _flip_middle(hex_value: str) -> str:
    mid = len(hex_value) // 2
    digit = "0" if hex_value[mid] != "0" else "1"
    return hex_value[:mid] + digit + hex_value[mid + 1:]


def _edit_manifest(files: BatchFiles, change: Callable[[dict[str, Any]], None]) -> None:
    document = json.loads(files.manifest.read_text(encoding="utf-8"))
    change(document)
    files.manifest.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _secrets(files: BatchFiles) -> list[dict[str, Any]]:
    return list(read_meter_secrets(files.secrets))


# --- whole-file rejections ----------------------------------------------------------------------
def rej_missing_manifest(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)
    files.manifest.unlink()
    return Case(files, "acme", re.escape(f"manifest {files.manifest.name} is missing"))


def rej_unsigned(fleet: Any, out: Path, start: int) -> Case:
    return Case(_acme(fleet, out, start, sign=False), "acme",
                re.escape("manifest signature is missing"))


def rej_signed_by_other_manufacturer(fleet: Any, out: Path, start: int) -> Case:
    # cygnus signs with P-256 like acme: same algorithm, wrong key.
    files = _acme(fleet, out, start)
    resign_manifest(files.manifest, fleet.makers["cygnus"].directory, vendor="cygnus")
    return Case(files, "acme", re.escape("manifest signature does not verify"))


def rej_signed_by_other_curve(fleet: Any, out: Path, start: int) -> Case:
    # borealis signs with P-384: the algorithm is not the one of acme's registered key.
    files = _acme(fleet, out, start)
    resign_manifest(files.manifest, fleet.makers["borealis"].directory, vendor="borealis")
    return Case(files, "acme", re.escape(
        "manifest signature ECDSA-P384-SHA384 does not match the vendor's key"))


def rej_tampered_signature(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)

    def flip(doc: dict[str, Any]) -> None:
        value = bytearray(base64.b64decode(doc["signature"]["value"]))
        value[-5] ^= 0x01  # inside s: still DER, no longer the signature
        doc["signature"]["value"] = base64.b64encode(bytes(value)).decode()

    _edit_manifest(files, flip)
    return Case(files, "acme", re.escape("manifest signature does not verify"))


def rej_manifest_for_other_vendor(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start, manifest_overrides={"vendor": "borealis"})
    return Case(files, "acme", re.escape("manifest is for vendor 'borealis', not 'acme'"))


def rej_manifest_field_missing(fleet: Any, out: Path, start: int) -> Case:
    from simulator.manufacturer import REMOVE

    files = _acme(fleet, out, start, manifest_overrides={"record_count": REMOVE})
    return Case(files, "acme", re.escape("manifest field 'record_count' is missing"))


CHECKSUM = re.escape("SHA-256 of the file does not match the manifest (truncated or altered file)")


def rej_checksum(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)
    header, rows = _read_csv(files.data)
    _set(header, rows, 5, "Model", "ACM-E999")  # altered after signing, not re-signed
    _write_csv(files.data, header, rows)
    return Case(files, "acme", CHECKSUM)


def _truncate(files: BatchFiles) -> None:
    lines = files.data.read_bytes().split(b"\r\n")
    keep = 1 + COUNT // 2  # header and the first half of the records
    files.data.write_bytes(b"\r\n".join(lines[:keep]) + b"\r\n")


def rej_truncated(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)
    _truncate(files)
    return Case(files, "acme", CHECKSUM)


def rej_truncated_resigned(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)
    _truncate(files)
    fleet.makers["acme"].resign(files.manifest, record_count=COUNT)
    return Case(files, "acme", re.escape(f"file holds {COUNT // 2} records, manifest says {COUNT}"))


def rej_empty(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)
    files.data.write_bytes(b"")
    fleet.makers["acme"].resign(files.manifest, record_count=0)
    return Case(files, "acme", re.escape("file is empty"))


def rej_latin1(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)
    raw = files.data.read_bytes()
    at = raw.index(b";ACM-E100;") + len(b";ACM-E")
    files.data.write_bytes(raw[:at] + b"\xe9" + raw[at:])  # latin-1 "é" in a UTF-8 file
    fleet.makers["acme"].resign(files.manifest)
    return Case(files, "acme", r"not valid utf-8 at byte \d+")


def _swap_transport_key(fleet: Any, files: Any, key_owner: str,
                        transport: bytes | None = None) -> None:
    """Put another transport key, RSA-wrapped under ``key_owner``'s import key, into an acme
    manifest, and re-sign it."""
    pem, oaep = fleet.keys[key_owner]
    wrapped = wrap_transport_key(transport or os.urandom(32), pem, oaep)

    def swap(doc: dict[str, Any]) -> None:
        doc["transport_key"]["wrapped"] = base64.b64encode(wrapped).decode()

    _edit_manifest(files, swap)
    fleet.makers["acme"].resign(files.manifest)


def rej_wrong_transport_key(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)
    _swap_transport_key(fleet, files, "acme")  # opens, but is not the batch's key
    return Case(files, "acme", re.escape(
        "transport key unwraps none of the file's keys (wrong transport key)"))


def rej_transport_key_for_other_import_key(fleet: Any, out: Path, start: int) -> Case:
    files = _acme(fleet, out, start)
    pem, oaep = fleet.keys["borealis"]
    wrapped = wrap_transport_key(os.urandom(32), pem, oaep)

    def swap(doc: dict[str, Any]) -> None:
        doc["transport_key"]["wrapped"] = base64.b64encode(wrapped).decode()
        doc["transport_key"]["import_key_sha256"] = spki_sha256(pem)

    _edit_manifest(files, swap)
    fleet.makers["acme"].resign(files.manifest)
    return Case(files, "acme", re.escape(
        "transport key is wrapped for another import key "
        "(import_key_sha256 does not match this vendor's)"))


def rej_transport_key_unwraps_not(fleet: Any, out: Path, start: int) -> Case:
    # The fingerprint claims acme's import key, but the RSA ciphertext is for borealis' key.
    files = _acme(fleet, out, start)
    _swap_transport_key(fleet, files, "borealis")
    return Case(files, "acme", re.escape(
        "transport key does not unwrap under the vendor's import key (wrong transport key)"))


def rej_missing_column(fleet: Any, out: Path, start: int) -> Case:
    def drop_gak(header: list[str], rows: list[list[str]]) -> None:
        at = header.index("GAK")
        del header[at]
        for row in rows:
            del row[at]

    return Case(_acme(fleet, out, start, drop_gak), "acme",
                re.escape("missing column(s): GAK (gak)"))


def rej_malformed_xml(fleet: Any, out: Path, start: int) -> Case:
    files = fleet.batch("cygnus", out, 20, serial_start=start, seed=start)
    text = files.data.read_text(encoding="utf-8")
    files.data.write_text(text.replace("</model>", "</mode1>", 1), encoding="utf-8")
    fleet.makers["cygnus"].resign(files.manifest)
    return Case(files, "cygnus", r"malformed XML: mismatched tag: line 3, column \d+")


def rej_jsonl_not_json(fleet: Any, out: Path, start: int) -> Case:
    files = fleet.batch("borealis", out, 20, serial_start=start, seed=start)
    lines = files.data.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[6] = lines[6].replace('{"', "{", 1)  # line 7: a key without its opening quote
    files.data.write_text("".join(lines), encoding="utf-8")
    fleet.makers["borealis"].resign(files.manifest)
    return Case(files, "borealis",
                re.escape("line 7: not JSON (Expecting property name enclosed in double quotes)"))


def rej_xlsx_sheet_missing(fleet: Any, out: Path, start: int) -> Case:
    from openpyxl import load_workbook

    files = fleet.batch("delta", out, 20, serial_start=start, seed=start)
    book = load_workbook(files.data)
    book["Keys"].title = "Sheet1"
    book.save(files.data)
    fleet.makers["delta"].resign(files.manifest)
    return Case(files, "delta", re.escape("sheet 'Keys' is missing"))


REJECTIONS = [
    pytest.param(rej_missing_manifest, id="missing-manifest"),
    pytest.param(rej_unsigned, id="signature-missing"),
    pytest.param(rej_signed_by_other_manufacturer, id="signed-by-other-manufacturer"),
    pytest.param(rej_signed_by_other_curve, id="signed-by-other-manufacturer-p384"),
    pytest.param(rej_tampered_signature, id="signature-byte-tampered"),
    pytest.param(rej_manifest_for_other_vendor, id="manifest-for-other-vendor"),
    pytest.param(rej_manifest_field_missing, id="manifest-field-missing"),
    pytest.param(rej_checksum, id="checksum-mismatch"),
    pytest.param(rej_truncated, id="truncated-checksum"),
    pytest.param(rej_truncated_resigned, id="truncated-resigned-record-count"),
    pytest.param(rej_empty, id="empty-file"),
    pytest.param(rej_latin1, id="latin1-in-utf8"),
    pytest.param(rej_wrong_transport_key, id="wrong-transport-key"),
    pytest.param(rej_transport_key_for_other_import_key, id="import-key-sha256-mismatch"),
    pytest.param(rej_transport_key_unwraps_not, id="transport-key-rsa-unwrap-fails"),
    pytest.param(rej_missing_column, id="missing-column"),
    pytest.param(rej_malformed_xml, id="malformed-xml"),
    pytest.param(rej_jsonl_not_json, id="jsonl-line-not-json"),
    pytest.param(rej_xlsx_sheet_missing, id="xlsx-sheet-missing"),
]


# --- per-row quarantine -------------------------------------------------------------------------
def q_bad_hex(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        key = _get(h, rows, 3, "GUEK")
        _set(h, rows, 3, "GUEK", key[:10] + "G" + key[11:])

    return Case(_acme(fleet, out, start, edit), "acme",
                quarantined=[(3, "guek", NOT_HEX, _serial("acme", start + 2))])


def q_key_length(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 1, "GBEK", _get(h, rows, 6, "GBEK"))  # suite 0 row, 80-hex key
        _set(h, rows, 3, "GAK", _get(h, rows, 4, "GAK"))  # suite 2 row, 48-hex key

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (1, "gbek", BAD_LENGTH, _serial("acme", start)),
        (3, "gak", BAD_LENGTH, _serial("acme", start + 2))])


def q_tampered_wrapped_key(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 4, "GBEK", _flip_middle(_get(h, rows, 4, "GBEK")))
        _set(h, rows, 9, "MK", _flip_middle(_get(h, rows, 9, "MK")))  # a suite-2 key too

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (4, "gbek", KW_FAILED, _serial("acme", start + 3)),
        (9, "kek", KW_FAILED, _serial("acme", start + 8))])


def q_duplicate_serial(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 10, "MeterNo", _get(h, rows, 2, "MeterNo"))

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (10, "serial", "duplicate serial in the file (first at row 2)",
         _serial("acme", start + 1))])


def q_duplicate_system_title(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 12, "SystemTitle", _get(h, rows, 4, "SystemTitle"))
        _set(h, rows, 13, "SystemTitle", _get(h, rows, 5, "SystemTitle").lower())  # same bytes

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (12, "system_title", "duplicate system_title in the file (first at row 4)",
         _serial("acme", start + 11)),
        (13, "system_title", "duplicate system_title in the file (first at row 5)",
         _serial("acme", start + 12))])


def q_duplicate_serial_in_inventory(fleet: Any, out: Path, start: int) -> Case:
    first = fleet.batch("acme", out / "a", 20, serial_start=start, seed=start)
    summary = fleet.run(first, "acme").result()
    assert (summary["imported"], summary["quarantined"]) == (20, 0)
    reused = _serial("acme", start + 2)  # row 3 of batch A

    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 6, "MeterNo", reused)

    files = _acme(fleet, out / "b", start + 100, edit)
    reason = (f"duplicate serial: already in the inventory (batch {summary['batch_id']}, row 3)")
    case = Case(files, "acme", quarantined=[(6, "serial", reason, reused)])
    case.plaintext |= {s[k] for s in _secrets(first) for k in ("guek", "gbek", "gak", "kek")}
    return case


def q_unknown_suite(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 2, "SecuritySuite", "S7")

    return Case(_acme(fleet, out, start, edit), "acme",
                quarantined=[(2, "suite", BAD_SUITE, _serial("acme", start + 1))])


def q_system_title_not_16_hex(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 4, "SystemTitle", _get(h, rows, 4, "SystemTitle")[:14])
        _set(h, rows, 7, "SystemTitle", "Z" + _get(h, rows, 7, "SystemTitle")[1:])
        _set(h, rows, 8, "SystemTitle", _get(h, rows, 8, "SystemTitle") + "00")

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (4, "system_title", BAD_TITLE, _serial("acme", start + 3)),
        (7, "system_title", BAD_TITLE, _serial("acme", start + 6)),
        (8, "system_title", BAD_TITLE, _serial("acme", start + 7))])


def q_serial_illegal(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 6, "MeterNo", "ACM 000/6")
        _set(h, rows, 8, "MeterNo", "A" * 33)
        _set(h, rows, 11, "MeterNo", "-ACM11")

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (6, "serial", BAD_SERIAL, ""), (8, "serial", BAD_SERIAL, ""),
        (11, "serial", BAD_SERIAL, "")])


def q_huge_field(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 9, "Model", "X" * 100_000)
        _set(h, rows, 10, "FwVersion", "1." * 40)  # 80 characters: over the text limit

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (9, "model", "longer than 8192 characters", _serial("acme", start + 8)),
        (10, "firmware", "longer than 64 characters", _serial("acme", start + 9))])


def q_formula_injection(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 5, "Model", '=HYPERLINK("http://evil.example/?a;b","click")')
        _set(h, rows, 11, "FwVersion", "@SUM(1)")
        _set(h, rows, 14, "Model", "+1-2")

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (5, "model", FORMULA, _serial("acme", start + 4)),
        (11, "firmware", FORMULA, _serial("acme", start + 10)),
        (14, "model", FORMULA, _serial("acme", start + 13))])


def q_missing_certificate(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 2, "FactoryCert", "")  # suite 1
        _set(h, rows, 6, "FactoryCert", "")  # suite 2

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (2, "certificate", NO_CERT, _serial("acme", start + 1)),
        (6, "certificate", NO_CERT, _serial("acme", start + 5))])


def q_extra_columns_ignored(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        h[3:3] = ["Comment"]
        h.append("Tariff")
        for n, row in enumerate(rows):
            row[3:3] = [f"note {n}"]
            row.append("T1")

    return Case(_acme(fleet, out, start, edit), "acme")


def q_control_characters(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 7, "FwVersion", "1.4.2\x1b[31m")
        _set(h, rows, 15, "FwVersion", "1.4\x072")

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (7, "firmware", CONTROL, _serial("acme", start + 6)),
        (15, "firmware", CONTROL, _serial("acme", start + 14))])


def q_jsonl_bad_hex(fleet: Any, out: Path, start: int) -> Case:
    files = fleet.batch("borealis", out, 20, serial_start=start, seed=start)
    lines = files.data.read_text(encoding="utf-8").splitlines(keepends=True)
    record = json.loads(lines[3])
    record["unicastKey"] = "Z" + record["unicastKey"][1:]
    lines[3] = json.dumps(record, ensure_ascii=False) + "\n"
    files.data.write_text("".join(lines), encoding="utf-8")
    fleet.makers["borealis"].resign(files.manifest)
    return Case(files, "borealis", quarantined=[(4, "guek", NOT_HEX, _serial("borealis",
                                                                             start + 3))])


def q_xml_bad_serial(fleet: Any, out: Path, start: int) -> Case:
    files = fleet.batch("cygnus", out, 20, serial_start=start, seed=start)
    text = files.data.read_text(encoding="utf-8")
    serial = _serial("cygnus", start + 2)
    files.data.write_text(text.replace(f'serial="{serial}"', 'serial="CYG#3"'), encoding="utf-8")
    fleet.makers["cygnus"].resign(files.manifest)
    return Case(files, "cygnus", quarantined=[(3, "serial", BAD_SERIAL, "")])


def q_xlsx_tampered_key(fleet: Any, out: Path, start: int) -> Case:
    from openpyxl import load_workbook

    files = fleet.batch("delta", out, 20, serial_start=start, seed=start)
    book = load_workbook(files.data)
    sheet = book["Keys"]
    header = [c.value for c in sheet[1]]
    cell = sheet.cell(row=1 + 2, column=1 + header.index("Authentication Key"))
    cell.value = _flip_middle(str(cell.value))
    book.save(files.data)
    fleet.makers["delta"].resign(files.manifest)
    return Case(files, "delta", quarantined=[(2, "gak", KW_FAILED, _serial("delta", start + 1))])


QUARANTINES = [
    pytest.param(q_bad_hex, id="bad-hex-key"),
    pytest.param(q_key_length, id="key-length-for-suite"),
    pytest.param(q_tampered_wrapped_key, id="tampered-wrapped-key"),
    pytest.param(q_duplicate_serial, id="duplicate-serial-in-file"),
    pytest.param(q_duplicate_system_title, id="duplicate-system-title-in-file"),
    pytest.param(q_duplicate_serial_in_inventory, id="duplicate-serial-in-inventory"),
    pytest.param(q_unknown_suite, id="unknown-suite"),
    pytest.param(q_system_title_not_16_hex, id="system-title-not-16-hex"),
    pytest.param(q_serial_illegal, id="serial-illegal-characters"),
    pytest.param(q_huge_field, id="huge-field"),
    pytest.param(q_formula_injection, id="formula-injection"),
    pytest.param(q_missing_certificate, id="missing-certificate"),
    pytest.param(q_extra_columns_ignored, id="extra-columns-ignored"),
    pytest.param(q_control_characters, id="control-characters"),
    pytest.param(q_jsonl_bad_hex, id="jsonl-bad-hex"),
    pytest.param(q_xml_bad_serial, id="xml-bad-serial"),
    pytest.param(q_xlsx_tampered_key, id="xlsx-tampered-key"),
]



# Rules of docs/batch-format.md section 6.2 that a first version of the importer missed; kept
# as their own table so that each stays named.
def q_certificate_for_suite_0(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 4, "FactoryCert", _get(h, rows, 2, "FactoryCert"))  # suite 0 row

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (4, "certificate", "given for suite 0", _serial("acme", start + 3))])


def q_certificate_not_der(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 2, "FactoryCert", base64.b64encode(b"not a certificate").decode())

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (2, "certificate", "not base64 DER", _serial("acme", start + 1))])


def q_bad_date(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 5, "ProductionDate", "2026-13-45")

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (5, "manufactured", "not an ISO 8601 date (YYYY-MM-DD)", _serial("acme", start + 4))])


def q_manufacturer_id_not_letters(fleet: Any, out: Path, start: int) -> Case:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 5, "SystemTitle", "313233" + _get(h, rows, 5, "SystemTitle")[6:])

    return Case(_acme(fleet, out, start, edit), "acme", quarantined=[
        (5, "system_title", "manufacturer id is not 3 letters", _serial("acme", start + 4))])


def rej_wrong_transport_key_first_rows_bad(fleet: Any, out: Path, start: int) -> Case:
    # As wrong-transport-key, but the first 8 rows fail field checks: the probe has no key.
    def edit(h: list[str], rows: list[list[str]]) -> None:
        for n in range(1, 9):
            _set(h, rows, n, "Model", "=1")

    files = _acme(fleet, out, start, edit)
    _swap_transport_key(fleet, files, "acme")
    return Case(files, "acme", re.escape(
        "transport key unwraps none of the file's keys (wrong transport key)"))


def _gap(build: Builder, id: str, reason: str) -> Any:
    return pytest.param(build, id=id)


SPEC_GAPS = [
    _gap(q_certificate_for_suite_0, "certificate-for-suite-0",
         "importer._check has no 'certificate given for suite 0' rule (spec 6.2)"),
    _gap(q_certificate_not_der, "certificate-not-der",
         "importer._check checks the base64 alphabet only, never decodes or parses DER"),
    _gap(q_bad_date, "bad-date", "importer._check has no date rule for 'manufactured'"),
    _gap(q_manufacturer_id_not_letters, "manufacturer-id-not-letters",
         "importer._check does not check the system title's 3-letter manufacturer id"),
    _gap(rej_wrong_transport_key_first_rows_bad, "wrong-transport-key-first-rows-bad",
         "intake._probe_transport_key probes only the good rows among the first 8"),
]

# --- checks -------------------------------------------------------------------------------------
def _inventory(engine: Any) -> tuple[dict[str, tuple[int, int]], int, list[ImportBatch]]:
    """(serial -> (batch id, source row), number of key_version rows, import batches)."""
    with db.transaction(engine) as session:
        meters = {m.serial: (m.batch_id, m.source_row)
                  for m in session.execute(select(Meter)).scalars()}
        keys = int(session.execute(select(func.count()).select_from(KeyVersion)).scalar_one())
        batches = list(session.execute(select(ImportBatch)).scalars())
        session.expunge_all()
    return meters, keys, batches


def _events(engine: Any, action: str) -> list[Any]:
    with db.snapshot(engine) as session:
        found = trail.events(session, limit=10_000, action=action)
        session.expunge_all()
    return found


def _plaintext(files: BatchFiles) -> set[str]:
    return {s[k] for s in _secrets(files) for k in ("guek", "gbek", "gak", "kek")}


def _assert_no_key_material(texts: list[str], plaintext: set[str]) -> None:
    assert plaintext
    for text in texts:
        folded = text.upper()
        leaked = [k for k in plaintext if k.upper() in folded]
        assert not leaked, f"key material in {text[:200]!r}"


def check_rejected(fleet: Any, case: Case) -> list[str]:
    """Run a rejected batch; assert the error and that nothing of it was written."""
    rejects_before = len(_events(fleet.engine, "batch.reject"))
    meters_before, keys_before, batches_before = _inventory(fleet.engine)
    state = fleet.run(case.files, case.vendor)
    name = case.files.data.name
    assert state.is_failed(), state.message
    assert case.error is not None
    with pytest.raises(Exception, match=f"^{re.escape(name)}: {case.error}$") as raised:
        state.result()
    assert name in (state.message or "")
    meters, keys, batches = _inventory(fleet.engine)
    assert (meters, keys) == (meters_before, keys_before)
    assert [b.status for b in batches if b.status != BatchStatus.REJECTED] == \
        [b.status for b in batches_before if b.status != BatchStatus.REJECTED]
    assert not [b for b in batches if b.file_name == name and b.status != BatchStatus.REJECTED]
    rejects = _events(fleet.engine, "batch.reject")
    assert len(rejects) == rejects_before + 1
    detail = json.loads(rejects[0].detail)
    assert (rejects[0].outcome, detail["file"], detail["vendor"]) == ("rejected", name,
                                                                     case.vendor)
    assert re.fullmatch(case.error, detail["reason"]), detail["reason"]
    return [state.message or "", str(raised.value), rejects[0].detail]


def check_quarantined(fleet: Any, case: Case, rerun: bool = True) -> list[str]:
    """Run a batch with bad rows; assert exactly those rows are quarantined and all the others
    imported, and (``rerun``) that a re-run changes nothing."""
    before, keys_before, _ = _inventory(fleet.engine)
    state = fleet.run(case.files, case.vendor)
    assert state.is_completed(), state.message
    summary = state.result()
    batch_id = summary["batch_id"]
    report = intake.quarantine_report(fleet.engine, batch_id)
    assert [(r["row"], r["field"], r["reason"], r["serial"]) for r in report] == case.quarantined
    bad_rows = {q[0] for q in case.quarantined}
    secrets = _secrets(case.files)
    good = {s["serial"]: n for n, s in enumerate(secrets, start=1) if n not in bad_rows}
    assert (summary["records"], summary["imported"], summary["quarantined"]) == (
        len(secrets), len(good), len(bad_rows))
    meters, keys, batches = _inventory(fleet.engine)
    mine = {serial: row for serial, (b, row) in meters.items() if b == batch_id}
    assert mine == good  # every good row, once, from its own row; no quarantined row
    for n in bad_rows:  # the row's own meter was not written
        assert secrets[n - 1]["serial"] not in mine
    assert {s: v for s, v in meters.items() if s not in mine} == before  # nothing else touched
    assert keys - keys_before == 4 * len(good)
    assert [b.status for b in batches if b.id == batch_id] == [BatchStatus.COMPLETED]
    quarantine_events = [e for e in _events(fleet.engine, "row.quarantine")
                         if e.batch_id == batch_id]
    assert sorted(json.loads(e.detail)["row"] for e in quarantine_events) == \
        sorted(q[0] for q in case.quarantined)

    if not rerun:
        return [state.message or "", json.dumps(summary), *(r["reason"] for r in report)]
    again = fleet.run(case.files, case.vendor)
    assert again.is_completed(), again.message
    assert again.result() == summary
    assert intake.quarantine_report(fleet.engine, batch_id) == report
    assert _inventory(fleet.engine)[:2] == (meters, keys)
    assert len([e for e in _events(fleet.engine, "row.quarantine")
                if e.batch_id == batch_id]) == len(quarantine_events)
    return [state.message or "", again.message or "", json.dumps(summary),
            *(r["reason"] for r in report)]


# --- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", REJECTIONS)
def test_whole_file_is_rejected(fleet, tmp_path: Path, build: Builder) -> None:
    case = build(fleet, tmp_path, 1)
    texts = check_rejected(fleet, case)
    _assert_no_key_material(texts, _plaintext(case.files))


@pytest.mark.parametrize("build", QUARANTINES)
def test_bad_rows_are_quarantined_and_the_rest_imported(fleet, tmp_path: Path,
                                                        build: Builder) -> None:
    case = build(fleet, tmp_path, 1)
    texts = check_quarantined(fleet, case)
    _assert_no_key_material(texts, _plaintext(case.files) | case.plaintext)


@pytest.mark.parametrize("build", SPEC_GAPS)
def test_spec_gaps(fleet, tmp_path: Path, build: Builder) -> None:
    case = build(fleet, tmp_path, 1)
    if case.error is not None:
        check_rejected(fleet, case)
    else:
        check_quarantined(fleet, case)


def test_redelivery_with_corrected_manifest_is_imported(fleet, tmp_path: Path) -> None:
    import random

    case = rej_wrong_transport_key_first_rows_bad(fleet, tmp_path, 1)
    first = fleet.run(case.files, "acme")
    assert first.is_failed()
    with pytest.raises(Exception, match="wrong transport key"):
        first.result()
    _swap_transport_key(fleet, case.files, "acme",
                        transport=random.Random(1).randbytes(32))  # make_batch's own key
    again = fleet.run(case.files, "acme")
    assert again.is_completed(), again.message
    assert again.result()["imported"] == COUNT - 8
