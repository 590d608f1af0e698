"""The reader's limits and layout rules, applied before parsing (docs/batch-format.md 2.1, 7)."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest
from openpyxl import Workbook

from lifecycle.errors import BatchError
from lifecycle.factory_import import reader
from lifecycle.factory_import.reader import Mapping, count_records, read_chunks

MAPPINGS = Path(__file__).resolve().parents[3] / "simulator" / "mappings"
HEADER = "MeterNo;SystemTitle;SecuritySuite;GUEK;GBEK;GAK;MK;FactoryCert;Model"


def _mapping(vendor: str) -> Mapping:
    return Mapping.parse((MAPPINGS / f"{vendor}.toml").read_text(encoding="utf-8"), vendor)


def _line(n: int) -> str:
    keys = ";".join(f"{n:02d}{k}".ljust(48, "A") for k in "0123")
    return f"ACM{n:010d};41434D{n:010X};S0;{keys};;ACM-E000"


def _csv(tmp_path: Path, body: str, prefix: bytes = b"") -> Path:
    path = tmp_path / "a.csv"
    path.write_bytes(prefix + body.encode("utf-8"))
    return path


def test_csv_with_utf8_byte_order_mark_reads_its_header(tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER}\r\n{_line(1)}\r\n{_line(2)}\r\n", b"\xef\xbb\xbf")
    chunk = next(read_chunks(path, _mapping("acme"), 10))
    assert (chunk.serial, chunk.rejects) == (["ACM0000000001", "ACM0000000002"], [])


def test_csv_empty_lines_are_not_records(tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER}\r\n{_line(1)}\r\n\r\n{_line(2)}\r\n\r\n\r\n")
    assert count_records(path, _mapping("acme")) == 2


def test_csv_quoted_line_break_is_refused(tmp_path: Path) -> None:
    path = _csv(tmp_path, f'{HEADER}\r\n{_line(1)}\r\n{_line(2)[:-8]}"ACM\r\nE000"\r\n')
    with pytest.raises(BatchError, match=re.escape(
            "a.csv: line 3: a quoted value spans lines (one record per line)")):
        count_records(path, _mapping("acme"))


def test_csv_line_longer_than_the_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER}\r\n{_line(1)}\r\n{_line(2)}{'X' * 300_000}\r\n")
    with pytest.raises(BatchError, match=re.escape(
            "a.csv: line 3 is longer than 262144 characters (limit)")):
        count_records(path, _mapping("acme"))


def test_record_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "MAX_RECORDS", 2)
    path = _csv(tmp_path, f"{HEADER}\r\n" + "".join(f"{_line(n)}\r\n" for n in range(1, 4)))
    with pytest.raises(BatchError, match=re.escape("a.csv: file holds more than 2 records "
                                                   "(limit)")):
        count_records(path, _mapping("acme"))


def test_jsonl_record_with_a_duplicate_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"meterSerial": "BOR1"}\n{"meterSerial": "BOR2", "meterSerial": "X"}\n',
                    encoding="utf-8")
    with pytest.raises(BatchError, match=re.escape(
            "b.jsonl: line 2: not JSON (duplicate name 'meterSerial')")):
        count_records(path, _mapping("borealis"))


def _xlsx(path: Path, rows: list[list[str | None]]) -> Path:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Keys"
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


XLSX_HEADER = ["Serial Number", "System Title", "Suite", "Unicast Encryption Key",
               "Broadcast Encryption Key", "Authentication Key", "Master Key"]


def test_blank_spreadsheet_rows_are_not_records(tmp_path: Path) -> None:
    record = ["DEL1", "44454C0000000001", "0", "A" * 48, "B" * 48, "C" * 48, "D" * 48]
    path = _xlsx(tmp_path / "d.xlsx", [XLSX_HEADER, record, [None] * 7, ["", " ", None],
                                       [*record[:1], "44454C0000000002", *record[2:]],
                                       [None] * 7])
    assert count_records(path, _mapping("delta")) == 2
    chunk = next(read_chunks(path, _mapping("delta"), 10))
    assert chunk.rows == [1]  # the second record is quarantined (same serial), numbered 2
    assert [r["row"] for r in chunk.rejects] == [2]


def test_xlsx_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    path = tmp_path / "d.xlsx"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/worksheets/sheet1.xml", b"<" + b"0" * 20_000_000 + b">")
    with pytest.raises(BatchError, match=re.escape(
            "d.xlsx: XLSX entry 'xl/worksheets/sheet1.xml' decompresses more than 100 times "
            "its size (limit)")):
        count_records(path, _mapping("delta"))


def test_xlsx_decompressed_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "MAX_XLSX_UNCOMPRESSED", 1000)
    path = _xlsx(tmp_path / "d.xlsx", [XLSX_HEADER])
    with pytest.raises(BatchError, match=re.escape(
            "d.xlsx: XLSX decompresses to more than 1000 bytes (limit)")):
        count_records(path, _mapping("delta"))


def test_chunk_carries_the_digest_of_each_wrapped_key(tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER}\r\n{_line(1)}\r\n")
    chunk = next(read_chunks(path, _mapping("acme"), 10))
    want = tuple(hashlib.sha256(k).hexdigest()[:32] for k in chunk.keys[0])
    assert chunk.source_digests == [want]
    assert all(len(d) == 32 for d in want)
    assert json.dumps(chunk.source_digests).count(chunk.keys[0][0].hex()) == 0
