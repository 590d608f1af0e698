"""Vendor factory files -> canonical records; the only module that uses pandas (and openpyxl).

Each vendor's file (CSV, JSON Lines, XML, XLSX) is mapped onto the canonical batch fields
(docs/batch-format.md) by a declarative TOML mapping. Files are read in chunks, so memory stays
flat whatever the file's size; every field of every row is checked here (format, length per
suite, hex, formula injection); the checks that need the inventory are ``rules``'.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import csv
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal
from xml.etree.ElementTree import ParseError
from zipfile import BadZipFile, ZipFile

import pandas as pd
from cryptography import x509
from defusedxml.ElementTree import iterparse
from openpyxl import load_workbook
from pydantic import BaseModel, ConfigDict, ValidationError

from lifecycle.errors import BatchError
from lifecycle.factory_import.batch_format import (
    CANONICAL_FIELDS,
    KEY_FIELDS,
    MAX_LINE_CHARS,
    MAX_RECORDS,
    MAX_XLSX_RATIO,
    MAX_XLSX_UNCOMPRESSED,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    SERIAL_RE,
    JsonRefused,
    source_digest,
    strict_json,
)
from lifecycle.policy import SUITES

MAX_FIELD = 8192  # bytes; a certificate is well under this, anything longer is hostile
MAX_TEXT = 64
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # OWASP CSV injection leaders


class Mapping(BaseModel):
    """A vendor's declarative mapping of its file onto the canonical fields."""

    model_config = ConfigDict(extra="forbid")

    vendor: str
    format: Literal["csv", "jsonl", "xml", "xlsx"]
    encoding: str = "utf-8"
    delimiter: str = ","
    record: str = "meter"
    sheet: str | None = None
    columns: dict[str, str]
    values: dict[str, dict[str, str]] = {}

    @classmethod
    def parse(cls, text: str, source: str) -> Mapping:
        """Parse a TOML mapping and check that it maps every required canonical field.

        Raises:
            BatchError: the mapping is not valid TOML or misses a field.
        """
        try:
            mapping = cls.model_validate(tomllib.loads(text))
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise BatchError(source, f"invalid mapping: {exc}".splitlines()[0]) from None
        unknown = set(mapping.columns) - set(CANONICAL_FIELDS)
        missing = set(REQUIRED_FIELDS) - set(mapping.columns)
        if unknown or missing:
            raise BatchError(source, f"mapping names unknown fields {sorted(unknown)} "
                                     f"or misses required {sorted(missing)}")
        return mapping


@dataclass
class Chunk:
    """Canonical records of one chunk that passed the field checks, plus the rejected rows.

    ``rows`` are 1-based record numbers in the file. Key fields hold the vendor's wrapped keys
    (bytes wrapped under the transport key: no plaintext); ``source_digests`` their digests
    (``batch_format.source_digest``), by which a wrapped key delivered twice is found.
    """

    rows: list[int] = field(default_factory=list)
    serial: list[str] = field(default_factory=list)
    system_title: list[str] = field(default_factory=list)
    suite: list[int] = field(default_factory=list)
    keys: list[tuple[bytes, ...]] = field(default_factory=list)
    source_digests: list[tuple[str, ...]] = field(default_factory=list)
    certificate: list[str | None] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0
    index: int = 0

    def __len__(self) -> int:
        return len(self.rows)


def read_chunks(path: Path, mapping: Mapping, chunk_size: int) -> Iterator[Chunk]:
    """Read a vendor file in chunks and check every field of every row.

    Raises:
        BatchError: the file cannot be read at all (encoding, structure, missing columns).
    """
    start = 1
    for index, frame in enumerate(_frames(path, mapping, chunk_size)):
        frame = _canonical(path, frame, mapping)
        frame.index = pd.RangeIndex(start, start + len(frame))
        start += len(frame)
        chunk = _check(frame)
        chunk.index = index
        yield chunk


def count_records(path: Path, mapping: Mapping, chunk_size: int = 50_000) -> int:
    """Parse the whole file once and return its record count (memory stays flat).

    Raises:
        BatchError: the file cannot be read (see ``read_chunks``).
    """
    return sum(len(_canonical(path, f, mapping)) for f in _frames(path, mapping, chunk_size))


# --- readers ------------------------------------------------------------------------------------
def _frames(path: Path, mapping: Mapping, chunk_size: int) -> Iterator[pd.DataFrame]:
    name = path.name
    try:
        if path.stat().st_size == 0:
            raise BatchError(name, "file is empty")
        if mapping.format == "csv":
            _precheck_csv(path, mapping)
            yield from pd.read_csv(path, sep=mapping.delimiter, encoding=_text_encoding(mapping),
                                   dtype=str, keep_default_na=False, chunksize=chunk_size,
                                   engine="c", on_bad_lines="error", skip_blank_lines=True)
        elif mapping.format == "jsonl":
            yield from _jsonl(path, mapping, chunk_size)
        elif mapping.format == "xml":
            yield from _xml(path, mapping, chunk_size)
        else:
            yield from _xlsx(path, mapping, chunk_size)
    except UnicodeDecodeError as exc:
        raise BatchError(name, f"not valid {mapping.encoding} at byte {exc.start}") from None
    except pd.errors.EmptyDataError:
        raise BatchError(name, "file holds no header and no records") from None
    except pd.errors.ParserError as exc:
        raise BatchError(name, f"malformed {mapping.format}: {str(exc)[:160]}") from None


def _text_encoding(mapping: Mapping) -> str:
    # docs/batch-format.md section 7: a UTF-8 byte-order mark at the very start of a text
    # file is allowed and ignored (spreadsheet programs write one); anywhere else it is data.
    try:
        utf8 = codecs.lookup(mapping.encoding).name == "utf-8"
    except LookupError:
        raise BatchError(f"mapping of vendor {mapping.vendor}",
                         f"unknown encoding {mapping.encoding!r}") from None
    return "utf-8-sig" if utf8 else mapping.encoding


def _bounded_lines(path: Path, mapping: Mapping) -> Iterator[str]:
    """Yield a text file's lines, refusing one longer than the limit before it is parsed."""
    with path.open(encoding=_text_encoding(mapping), newline="") as fh:
        number = 0
        while line := fh.readline(MAX_LINE_CHARS + 1):
            number += 1
            if len(line) > MAX_LINE_CHARS:
                raise BatchError(path.name, f"line {number} is longer than {MAX_LINE_CHARS} "
                                            "characters (limit)")
            yield line


def _too_many(path: Path) -> BatchError:
    return BatchError(path.name, f"file holds more than {MAX_RECORDS} records (limit)")


def _precheck_csv(path: Path, mapping: Mapping) -> None:
    # One pass before pandas parses: line length, record count, and "one record per line"
    # (docs/batch-format.md section 7: a quoted value may not span lines).
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_CHARS))
    reader = csv.reader(_bounded_lines(path, mapping), delimiter=mapping.delimiter)
    records, last = -1, 0  # the header is not a record
    try:
        for row in reader:
            if reader.line_num != last + 1:
                raise BatchError(path.name, f"line {last + 1}: a quoted value spans lines "
                                            "(one record per line)")
            last = reader.line_num
            records += 1 if row else 0
            if records > MAX_RECORDS:
                raise _too_many(path)
    except csv.Error as exc:
        raise BatchError(path.name, f"malformed csv: line {reader.line_num}: {exc}") from None


def _jsonl(path: Path, mapping: Mapping, chunk_size: int) -> Iterator[pd.DataFrame]:
    batch: list[dict[str, Any]] = []
    records = 0
    for number, line in enumerate(_bounded_lines(path, mapping), start=1):
        if not line.strip():
            continue
        try:
            record = strict_json(line)
        except JsonRefused as exc:
            raise BatchError(path.name, f"line {number}: not JSON ({exc.reason})") from None
        if not isinstance(record, dict):
            raise BatchError(path.name, f"line {number}: not a JSON object")
        records += 1
        if records > MAX_RECORDS:
            raise _too_many(path)
        batch.append({k: "" if v is None else str(v) for k, v in record.items()})
        if len(batch) == chunk_size:
            yield pd.DataFrame(batch, dtype=str)
            batch = []
    if batch:
        yield pd.DataFrame(batch, dtype=str)


def _xml(path: Path, mapping: Mapping, chunk_size: int) -> Iterator[pd.DataFrame]:
    batch: list[dict[str, str]] = []
    records = 0
    try:
        for _event, elem in iterparse(str(path), events=("end",), forbid_dtd=True):
            if _local(elem.tag) != mapping.record:
                continue
            record = {f"@{k}": v for k, v in elem.attrib.items()}
            record.update({_local(child.tag): (child.text or "").strip() for child in elem})
            batch.append(record)
            elem.clear()
            records += 1
            if records > MAX_RECORDS:
                raise _too_many(path)
            if len(batch) == chunk_size:
                yield pd.DataFrame(batch, dtype=str)
                batch = []
    except ParseError as exc:
        raise BatchError(path.name, f"malformed XML: {exc}") from None
    except Exception as exc:  # defusedxml raises its own types for entity and DTD attacks
        if type(exc).__module__.startswith("defusedxml"):
            raise BatchError(path.name, f"XML refused: {type(exc).__name__}") from None
        raise
    if batch:
        yield pd.DataFrame(batch, dtype=str)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _check_zip(path: Path) -> None:
    # Before openpyxl inflates anything: the workbook's declared sizes (a zip bomb declares
    # them too, or lies and then fails zipfile's own size check while reading).
    try:
        with ZipFile(path) as archive:
            entries = archive.infolist()
    except (BadZipFile, OSError) as exc:
        raise BatchError(path.name, f"not a readable XLSX file ({type(exc).__name__})") from None
    if sum(e.file_size for e in entries) > MAX_XLSX_UNCOMPRESSED:
        raise BatchError(path.name, f"XLSX decompresses to more than {MAX_XLSX_UNCOMPRESSED} "
                                    "bytes (limit)")
    for entry in entries:
        inflated = entry.file_size > MAX_XLSX_RATIO * max(1, entry.compress_size)
        if entry.file_size > 65536 and inflated:
            raise BatchError(path.name, f"XLSX entry {entry.filename[:64]!r} decompresses more "
                                        f"than {MAX_XLSX_RATIO} times its size (limit)")


def _blank(values: tuple[Any, ...]) -> bool:
    # An empty spreadsheet row (formatted, or left between records) is not a record.
    return all(v is None or not str(v).strip() for v in values)


def _xlsx(path: Path, mapping: Mapping, chunk_size: int) -> Iterator[pd.DataFrame]:
    _check_zip(path)
    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except (BadZipFile, KeyError, OSError) as exc:
        raise BatchError(path.name, f"not a readable XLSX file ({type(exc).__name__})") from None
    try:
        sheet = book[mapping.sheet] if mapping.sheet else book.active
        rows = sheet.iter_rows(values_only=True)
        header = [str(h) if h is not None else "" for h in next(rows, ())]
        batch: list[list[str]] = []
        records = 0
        for values in rows:
            if _blank(values):
                continue
            records += 1
            if records > MAX_RECORDS:
                raise _too_many(path)
            batch.append(["" if v is None else str(v) for v in values])
            if len(batch) == chunk_size:
                yield pd.DataFrame(batch, columns=header, dtype=str)
                batch = []
        if batch:
            yield pd.DataFrame(batch, columns=header, dtype=str)
    except KeyError:
        raise BatchError(path.name, f"sheet {mapping.sheet!r} is missing") from None
    finally:
        book.close()


# --- mapping and checks -------------------------------------------------------------------------
def _canonical(path: Path, frame: pd.DataFrame, mapping: Mapping) -> pd.DataFrame:
    missing = [f"{col} ({canon})" for canon, col in mapping.columns.items()
               if canon in REQUIRED_FIELDS and col not in frame.columns]
    if missing:
        raise BatchError(path.name, f"missing column(s): {', '.join(missing)}")
    out = pd.DataFrame(index=frame.index)
    for canon in CANONICAL_FIELDS:
        col = mapping.columns.get(canon)
        series = frame[col] if col in frame.columns else pd.Series("", index=frame.index)
        series = series.fillna("").astype(str).str.strip()
        if canon in mapping.values:
            series = series.replace(mapping.values[canon])
        out[canon] = series
    return out


_SERIAL = SERIAL_RE.pattern
_FLAG_TITLE = r"(?:4[1-9A-Fa-f]|5[0-9Aa]){3}[0-9A-Fa-f]{10}"  # 'A'..'Z' x 3, then 5 bytes


def _is_der_certificate(text: str) -> bool:
    # Parsed, not verified: the claim flow verifies the chain (DESIGN.md process 2).
    if not text:
        return True
    try:
        x509.load_der_x509_certificate(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False
    return True


def _is_iso_date(text: str) -> bool:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _check(frame: pd.DataFrame) -> Chunk:
    errors: dict[int, tuple[str, str]] = {}

    def flag(mask: pd.Series, fld: str, reason: str) -> None:
        for row in frame.index[mask]:
            errors.setdefault(int(row), (fld, reason))

    too_long = frame.apply(lambda col: col.str.len() > MAX_FIELD)
    for fld in CANONICAL_FIELDS:
        flag(too_long[fld], fld, f"longer than {MAX_FIELD} characters")
    flag(frame.serial == "", "serial", "missing")
    flag(~frame.serial.str.fullmatch(_SERIAL), "serial", "not 1-32 letters, digits, '.', '_', '-'")
    flag(~frame.system_title.str.fullmatch(r"[0-9A-Fa-f]{16}"), "system_title",
         "not 16 hex characters (8 bytes)")
    # DLMS Green Book: a system title starts with the manufacturer's three-letter FLAG id.
    flag(~frame.system_title.str.fullmatch(_FLAG_TITLE), "system_title",
         "manufacturer id is not 3 letters")
    suite_ok = frame.suite.isin([str(s) for s in SUITES])
    flag(~suite_ok, "suite", "unknown suite (expected 0, 1 or 2)")
    suites = frame.suite.where(suite_ok, "0").astype(int)
    want = suites.map(lambda s: 2 * SUITES[s].wrapped_len)
    for fld in KEY_FIELDS:
        col = frame[fld]
        flag(~col.str.fullmatch(r"[0-9A-Fa-f]+"), fld, "missing or not hex")
        flag(col.str.len() != want, fld, "wrapped key length does not match the suite")
    needs_cert = suites.map(lambda s: SUITES[s].needs_certificate) & suite_ok
    flag(needs_cert & (frame.certificate == ""), "certificate", "missing for suite 1 or 2")
    has_cert = frame.certificate != ""
    flag(has_cert & ~needs_cert & suite_ok, "certificate", "given for suite 0")
    flag(has_cert & ~frame.certificate.map(_is_der_certificate), "certificate", "not base64 DER")
    dated = frame.manufactured != ""
    flag(dated & ~frame.manufactured.map(_is_iso_date), "manufactured",
         "not an ISO 8601 date (YYYY-MM-DD)")
    for fld in OPTIONAL_FIELDS[1:]:
        col = frame[fld]
        flag(col.str.startswith(FORMULA_PREFIXES), fld, "starts with a formula character")
        flag(col.str.len() > MAX_TEXT, fld, f"longer than {MAX_TEXT} characters")
        flag(col.str.contains(r"[\x00-\x1f\x7f]", regex=True), fld, "holds control characters")
    # Duplicates inside the chunk; duplicates across chunks and against the inventory are
    # decided by ``rules`` when the chunk is stored, where the inventory is the reference.
    for fld in ("serial", "system_title"):
        key = frame[fld].str.upper() if fld == "system_title" else frame[fld]
        repeated = key.duplicated(keep="first") & (key != "")
        if repeated.any():
            first = {value: row for row, value in key[~key.duplicated(keep="first")].items()}
            for row in frame.index[repeated]:
                errors.setdefault(int(row), (fld, f"duplicate {fld} in the file (first at row "
                                                  f"{first[key[row]]})"))
    return _chunk(frame, errors)


def _chunk(frame: pd.DataFrame, errors: dict[int, tuple[str, str]]) -> Chunk:
    chunk = Chunk(read=len(frame))
    serials = frame.serial.tolist()
    for row, (fld, reason) in sorted(errors.items()):
        serial = serials[row - frame.index[0]]
        chunk.rejects.append({"row": row, "field": fld, "reason": reason,
                              "serial": serial if re.fullmatch(_SERIAL, serial) else None})
    good = frame.drop(index=list(errors))
    chunk.rows = [int(r) for r in good.index]
    chunk.serial = good.serial.tolist()
    chunk.system_title = good.system_title.str.upper().tolist()
    chunk.suite = good.suite.astype(int).tolist()
    chunk.keys = list(zip(*(map(bytes.fromhex, good[f].tolist()) for f in KEY_FIELDS),
                          strict=True))
    chunk.source_digests = [tuple(source_digest(k) for k in row) for row in chunk.keys]
    chunk.certificate = [c or None for c in good.certificate.tolist()]
    return chunk
