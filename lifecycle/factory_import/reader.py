"""Vendor factory files -> canonical records; the only module that uses pandas (and openpyxl).

Each vendor's file (CSV, JSON Lines, XML, XLSX) is mapped onto the canonical batch fields
(docs/batch-format.md) by a declarative TOML mapping. Files are read in chunks, so memory stays
flat whatever the file's size; every field of every row is checked here (format, length per
suite, hex, formula injection); the checks that need the inventory are ``rules``'.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal
from xml.etree.ElementTree import ParseError
from zipfile import BadZipFile

import pandas as pd
from cryptography import x509
from defusedxml.ElementTree import iterparse
from openpyxl import load_workbook
from pydantic import BaseModel, ConfigDict, ValidationError

from lifecycle.errors import BatchError
from lifecycle.factory_import.batch_format import (
    CANONICAL_FIELDS,
    KEY_FIELDS,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    SERIAL_RE,
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
    (bytes wrapped under the transport key: no plaintext).
    """

    rows: list[int] = field(default_factory=list)
    serial: list[str] = field(default_factory=list)
    system_title: list[str] = field(default_factory=list)
    suite: list[int] = field(default_factory=list)
    keys: list[tuple[bytes, ...]] = field(default_factory=list)
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
            yield from pd.read_csv(path, sep=mapping.delimiter, encoding=mapping.encoding,
                                   dtype=str, keep_default_na=False, chunksize=chunk_size,
                                   engine="c", on_bad_lines="error")
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


def _jsonl(path: Path, mapping: Mapping, chunk_size: int) -> Iterator[pd.DataFrame]:
    batch: list[dict[str, Any]] = []
    with path.open(encoding=mapping.encoding) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BatchError(path.name, f"line {number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise BatchError(path.name, f"line {number}: not a JSON object")
            batch.append({k: "" if v is None else str(v) for k, v in record.items()})
            if len(batch) == chunk_size:
                yield pd.DataFrame(batch, dtype=str)
                batch = []
    if batch:
        yield pd.DataFrame(batch, dtype=str)


def _xml(path: Path, mapping: Mapping, chunk_size: int) -> Iterator[pd.DataFrame]:
    batch: list[dict[str, str]] = []
    try:
        for _event, elem in iterparse(str(path), events=("end",), forbid_dtd=True):
            if _local(elem.tag) != mapping.record:
                continue
            record = {f"@{k}": v for k, v in elem.attrib.items()}
            record.update({_local(child.tag): (child.text or "").strip() for child in elem})
            batch.append(record)
            elem.clear()
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


def _xlsx(path: Path, mapping: Mapping, chunk_size: int) -> Iterator[pd.DataFrame]:
    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except (BadZipFile, KeyError, OSError) as exc:
        raise BatchError(path.name, f"not a readable XLSX file ({type(exc).__name__})") from None
    try:
        sheet = book[mapping.sheet] if mapping.sheet else book.active
        rows = sheet.iter_rows(values_only=True)
        header = [str(h) if h is not None else "" for h in next(rows, ())]
        batch: list[list[str]] = []
        for values in rows:
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
    chunk.certificate = [c or None for c in good.certificate.tolist()]
    return chunk
