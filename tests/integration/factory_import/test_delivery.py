"""Staged deliveries and strict delivery checks (issue 10), end to end through the flow.

Attacks are made as an attacker would: the delivered files edited on disk, rows written into
the inventory with plain SQL. Batches of the independent writer follow docs/batch-format.md
only (plain csv/json/cryptography, no simulator code).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from sqlalchemy import text

from lifecycle.factory_import import steps as intake
from lifecycle.inventory import db
from lifecycle.inventory.batches import BatchStatus
from tasks import factory_import as import_tasks
from tests.integration.factory_import.test_bad_batches import (
    COUNT,
    Case,
    _acme,
    _events,
    _get,
    _inventory,
    _read_csv,
    _set,
    check_quarantined,
    check_rejected,
)
from tests.unit.factory_import.test_manifest import independent_canonical

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]
HOME = Path(os.environ["METERKEYS_HOME"])


def _staging_left() -> list[str]:
    root = HOME.resolve() / "staging"
    return sorted(os.listdir(root)) if root.exists() else []


# --- staging ------------------------------------------------------------------------------------
def test_swapping_the_file_after_verification_changes_nothing(fleet, tmp_path: Path,
                                                              monkeypatch) -> None:
    files = fleet.batch("acme", tmp_path / "a", 6, serial_start=500)
    planted = fleet.batch("acme", tmp_path / "p", 7, serial_start=900)  # 7 valid-looking rows
    real_verify = import_tasks.intake.verify_batch

    def verify_then_swap(*args: Any, **kwargs: Any) -> Any:
        plan = real_verify(*args, **kwargs)
        shutil.copyfile(planted.data, files.data)  # the attacker's move, after verification
        shutil.copyfile(planted.manifest, files.manifest)
        return plan

    monkeypatch.setattr(import_tasks.intake, "verify_batch", verify_then_swap)
    state = fleet.run(files, "acme")
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["records"], summary["imported"], summary["quarantined"]) == (6, 6, 0)
    meters, _, _ = _inventory(fleet.engine)
    assert not [s for s in meters if s.startswith("ACM00000009")]  # no planted meter
    assert len(meters) == 6
    assert _staging_left() == []  # removed on completion


def test_rejected_delivery_leaves_no_staged_copy(fleet, tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 5)
    files.data.write_bytes(files.data.read_bytes() + b"x")
    assert fleet.run(files, "acme").is_failed()
    assert _staging_left() == []


def test_rows_planted_in_the_inventory_fail_the_batch_total(fleet, tmp_path: Path,
                                                            monkeypatch) -> None:
    files = fleet.batch("acme", tmp_path, 6, serial_start=700)
    real_finish = import_tasks.intake.finish_batch

    def plant_then_finish(engine: Any, settings: Any, actor: Any, plan: Any, now: Any) -> Any:
        with engine.begin() as conn:  # a database writer, plain SQL
            conn.execute(text(
                "INSERT INTO meter (serial, system_title, suite, vendor_id, batch_id, source_row,"
                " state, created_at, updated_at) VALUES ('EVL0000000001', '45564C0000000001', 0,"
                " :vendor, :batch, 99, 'registered', '2026-01-01', '2026-01-01')"),
                {"vendor": plan.vendor_id, "batch": plan.batch_id})
        return real_finish(engine, settings, actor, plan, now)

    monkeypatch.setattr(import_tasks.intake, "finish_batch", plant_then_finish)
    rejects_before = len(_events(fleet.engine, "batch.reject"))
    state = fleet.run(files, "acme")
    assert state.is_failed()
    with pytest.raises(Exception, match=re.escape(
            f"{files.data.name}: 7 imported + 0 quarantined rows differ from the manifest's "
            "record_count 6")):
        state.result()
    _, _, batches = _inventory(fleet.engine)
    assert [b.status for b in batches] == [BatchStatus.IMPORTING]  # never "completed"
    assert len(_events(fleet.engine, "batch.reject")) == rejects_before + 1


# --- duplicate wrapped keys ---------------------------------------------------------------------
DUP = "duplicate wrapped key in the file (first at row {})"


def test_wrapped_key_seen_twice_in_one_delivery_is_quarantined(fleet, tmp_path: Path) -> None:
    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 7, "GAK", _get(h, rows, 4, "GAK"))  # rows 4 and 7: suite 0, same length
        _set(h, rows, 10, "GBEK", _get(h, rows, 10, "GUEK"))

    files = _acme(fleet, tmp_path, 1, edit)
    check_quarantined(fleet, Case(files, "acme", quarantined=[
        (7, "gak", DUP.format(4), "ACM0000000007"),
        (10, "gbek", "duplicate wrapped key: same as guek of this row", "ACM0000000010")]))


def test_wrapped_key_seen_in_an_earlier_delivery_is_quarantined(fleet, tmp_path: Path) -> None:
    first = _acme(fleet, tmp_path / "a", 1)
    summary = fleet.run(first, "acme").result()
    _, old = _read_csv(first.data)

    def edit(h: list[str], rows: list[list[str]]) -> None:
        _set(h, rows, 3, "MK", old[5][h.index("MK")])  # row 6 of the first delivery, suite 2

    files = _acme(fleet, tmp_path / "b", 100, edit)
    reason = f"duplicate wrapped key: already in the inventory (batch {summary['batch_id']}, row 6)"
    check_quarantined(fleet, Case(files, "acme", quarantined=[(3, "kek", reason,
                                                                "ACM0000000102")]))
    with db.transaction(fleet.engine) as session:
        digests = session.execute(text("SELECT source_digest FROM key_version")).scalars().all()
    assert len(digests) == 4 * (2 * COUNT - 1) and all(re.fullmatch("[0-9a-f]{32}", d)
                                                        for d in digests)


# --- manifest strictness through the rejection path ---------------------------------------------
def _manifest_text(fleet: Any, tmp_path: Path, old: str, new: str) -> Case:
    files = _acme(fleet, tmp_path, 1)
    raw = files.manifest.read_text(encoding="utf-8")
    assert old in raw
    files.manifest.write_text(raw.replace(old, new, 1), encoding="utf-8")
    return Case(files, "acme")


NAMED = "manifest {}.manifest.json is not valid UTF-8 JSON "
MANIFESTS = [
    pytest.param(f'"record_count": {COUNT}', '"record_count": NaN',
                 r"\(NaN is not a JSON number\)", id="nan"),
    pytest.param(f'"record_count": {COUNT}', '"record_count": ' + "9" * 5000,
                 r"\(integer of more than 18 digits\)", id="huge-integer"),
    pytest.param('"format"', '"x": ' + "[" * 3000 + "]" * 3000 + ', "format"',
                 r"\(nested deeper than 16 levels\)", id="deep-nesting"),
    pytest.param('"batch_ref": "', '"batch_ref": "\\udc00', r"\(a string holds a lone surrogate",
                 id="lone-surrogate"),
    pytest.param('"vendor": "acme"', '"vendor": "acme", "vendor": "acme"',
                 r"\(duplicate name 'vendor'\)", id="duplicate-name"),
]


@pytest.mark.parametrize(("old", "new", "reason"), MANIFESTS)
def test_manifest_parse_failures_are_audited_rejections(fleet, tmp_path: Path, old: str,
                                                        new: str, reason: str) -> None:
    case = _manifest_text(fleet, tmp_path, old, new)
    case.error = re.escape(NAMED.format(case.files.data.name)) + reason + ".*"
    check_rejected(fleet, case)


def test_boolean_record_count_is_rejected(fleet, tmp_path: Path) -> None:
    files = _acme(fleet, tmp_path, 1, manifest_overrides={"record_count": True})
    check_rejected(fleet, Case(files, "acme", re.escape(
        "manifest field 'record_count' is not an integer")))


def test_file_name_must_match_the_delivered_file(fleet, tmp_path: Path) -> None:
    files = _acme(fleet, tmp_path, 1)
    renamed = files.data.with_name("renamed.csv")
    files.data.rename(renamed)
    files.manifest.rename(renamed.with_name("renamed.csv.manifest.json"))
    case = Case(files, "acme", re.escape(f"manifest file_name '{files.data.name}' is not the "
                                         "delivered file 'renamed.csv'"))
    case.files = type(files)(renamed, renamed.with_name("renamed.csv.manifest.json"),
                             files.secrets, files.count)
    check_rejected(fleet, case)


# --- layout rules -------------------------------------------------------------------------------
def test_blank_spreadsheet_rows_are_not_records(fleet, tmp_path: Path) -> None:
    from openpyxl import load_workbook

    files = fleet.batch("delta", tmp_path, 12)
    book = load_workbook(files.data)
    sheet = book["Keys"]
    sheet.insert_rows(5, amount=2)  # two empty rows between records
    sheet.cell(row=sheet.max_row + 3, column=1).number_format = "@"  # a formatted empty row
    book.save(files.data)
    fleet.makers["delta"].resign(files.manifest)
    state = fleet.run(files, "delta")
    assert state.is_completed(), state.message
    assert (state.result()["records"], state.result()["imported"]) == (12, 12)


def test_serials_are_unique_across_vendors(fleet, tmp_path: Path) -> None:
    first = _acme(fleet, tmp_path / "a", 1)
    acme = fleet.run(first, "acme").result()
    files = fleet.batch("borealis", tmp_path / "b", 6)
    lines = files.data.read_text(encoding="utf-8").splitlines(keepends=True)
    record = json.loads(lines[1])
    record["meterSerial"] = "ACM0000000003"
    lines[1] = json.dumps(record) + "\n"
    files.data.write_text("".join(lines), encoding="utf-8")
    fleet.makers["borealis"].resign(files.manifest)
    state = fleet.run(files, "borealis")
    assert state.is_completed(), state.message
    report = intake.quarantine_report(fleet.engine, state.result()["batch_id"])
    assert report == [{"row": 2, "field": "serial", "serial": "ACM0000000003", "reason":
                       f"duplicate serial: already in the inventory (batch {acme['batch_id']}, "
                       "row 3)"}]


# --- an independent implementation of docs/batch-format.md --------------------------------------
def _independent_batch(fleet: Any, out: Path, vendor: str, fmt: str, count: int,
                       transport_key: bytes, sent_key: bytes | None = None) -> Path:
    """Write a batch from the document alone: section 3 fields, section 4 wrapping, section 5
    manifest (canonical bytes per 5.1), section 7 layout for the vendor's mapping."""
    columns = {"acme": ["MeterNo", "SystemTitle", "SecuritySuite", "GUEK", "GBEK", "GAK", "MK",
                        "FactoryCert", "Model"],
               "borealis": ["meterSerial", "sysTitle", "securitySuite", "unicastKey",
                            "broadcastKey", "authKey", "masterKey", "deviceModel"]}[vendor]
    suite = {"acme": "S0", "borealis": "AES-GCM-128"}[vendor]
    flag = vendor[:3].upper()
    records = []
    for n in range(1, count + 1):
        title = flag.encode().hex().upper() + f"{4000 + n:010X}"
        keys = [aes_key_wrap(transport_key, os.urandom(16)).hex().upper() for _ in range(4)]
        values = [f"{flag}{4000 + n:010d}", title, suite, *keys]
        values += ["", "Zähler-E0"] if vendor == "acme" else ["Zähler-E0"]
        records.append(dict(zip(columns, values, strict=True)))
    data = out / f"indep-{vendor}.{fmt}"
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns, delimiter=";", lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(records)
        data.write_bytes(b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8"))  # with a BOM
    else:
        data.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                         .encode("utf-8"))
    import_pem, oaep = fleet.keys[vendor]
    public = serialization.load_pem_public_key(import_pem.encode())
    # SoftHSM2 2.6.1 has OAEP with SHA-1 only (section 4 step 3, RSA-OAEP-SHA1).
    algorithm = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256()}[oaep]  # noqa: S303
    wrapped = public.encrypt(sent_key or transport_key, padding.OAEP(  # type: ignore[union-attr]
        mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None))
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    body = {"format": "meterkeys-batch/1", "vendor": vendor, "batch_ref": "Lieferung Nr. 7 – ü",
            "file_name": data.name, "file_sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
            "record_count": count, "created": "2026-11-28T16:08:29Z",
            "transport_key": {"alg": f"RSA-OAEP-{oaep.upper()}",
                              "import_key_sha256": hashlib.sha256(der).hexdigest(),
                              "wrapped": base64.b64encode(wrapped).decode()}}
    key_file = fleet.makers[vendor].directory / f"{vendor}.signing-key.pem"
    signing = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert isinstance(signing, ec.EllipticCurvePrivateKey)
    digest = hashes.SHA384() if signing.curve.key_size == 384 else hashes.SHA256()
    signature = signing.sign(independent_canonical(body).encode("ascii"), ec.ECDSA(digest))
    alg = "ECDSA-P384-SHA384" if signing.curve.key_size == 384 else "ECDSA-P256-SHA256"
    manifest = {"signature": {"alg": alg, "value": base64.b64encode(signature).decode()}, **body}
    data.with_name(data.name + ".manifest.json").write_text(json.dumps(manifest, indent=1),
                                                            encoding="utf-8")
    return data


@pytest.mark.parametrize(("vendor", "fmt"), [("acme", "csv"), ("borealis", "jsonl")])
def test_batches_of_an_independent_writer_import(fleet, tmp_path: Path, vendor: str,
                                                 fmt: str) -> None:
    data = _independent_batch(fleet, tmp_path, vendor, fmt, 9, os.urandom(32))
    state = fleet.run(data, vendor)
    assert state.is_completed(), state.message
    assert (state.result()["imported"], state.result()["quarantined"]) == (9, 0)


# --- transport key length -----------------------------------------------------------------------
def test_transport_key_of_no_aes_length_is_rejected(fleet, tmp_path: Path) -> None:
    # The manifest carries a 20-byte transport key (no AES key has that length); the module
    # takes it, but it opens none of the keys (section 6.1: wrong transport key).
    short = _independent_batch(fleet, tmp_path, "acme", "csv", 3, os.urandom(32),
                               sent_key=os.urandom(20))
    state = fleet.run(short, "acme")
    assert state.is_failed()
    with pytest.raises(Exception, match="transport key"):
        state.result()


def test_aes_128_transport_key_is_not_detected_on_softhsm2(fleet, tmp_path: Path) -> None:
    """Documents a limit (docs/batch-format.md section 4): SoftHSM2 2.6.1 refuses CKA_VALUE_LEN
    in an unwrap template (CKR_ATTRIBUTE_READ_ONLY), reports 0 after the unwrap, and leaves the
    unwrap-only transport key no operation whose result depends on its length, so an AES-128
    transport key cannot be told from an AES-256 one. Fails loudly if that ever changes."""
    assert fleet.settings.is_softhsm
    data = _independent_batch(fleet, tmp_path, "acme", "csv", 3, os.urandom(16))
    state = fleet.run(data, "acme")
    assert state.is_completed(), state.message


# --- the command line ---------------------------------------------------------------------------
def test_failed_import_prints_one_error_line_and_no_traceback(fleet, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    files = fleet.batch("acme", tmp_path, 4)
    files.data.write_bytes(files.data.read_bytes() + b"x")  # checksum mismatch
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    env.update(METERKEYS_DATABASE_URL=fleet.db_url,
               METERKEYS_PRINCIPAL_KEY=str(fleet.ids.key_path("test-operator")),
               PREFECT_API_URL=str(PREFECT_API_URL.value()))
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "import", str(files.data), "--vendor", "acme",
         "--workers", "0"], capture_output=True, text=True, env=env, timeout=300,
        cwd=Path(__file__).resolve().parents[3], check=False)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {files.data.name}: SHA-256 of the file does not match the "
                     "manifest (truncated or altered file)"], result.stderr
    assert result.stdout == ""
