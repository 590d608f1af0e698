"""No plaintext meter key and no token PIN is stored anywhere a factory import leaves data:
the inventory, Prefect's API database (+ -wal/-shm), every file under PREFECT_HOME and the
test's home, what the Prefect API returns (logs, artifacts, flow/task run parameters and
state messages) and the test's captured output. The same scan is then shown to find a key
planted on purpose in each kind of place."""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from simulator.manufacturer import read_meter_secrets
from tests import secret_scan

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.prefect_heartbeats]


# --- where things are ------------------------------------------------------------------------
def prefect_db_path() -> Path:
    """The SQLite file of the harness's server (set by prefect_test_harness)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    assert url and url.startswith("sqlite"), "the Prefect test server must use SQLite"
    path = Path(url.split("///", 1)[1])
    assert path.is_file(), "Prefect test server database not found"
    return path


def prefect_home() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value())


def flush_prefect_logs() -> None:
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


def wait_for_flow_run_events(flow_run_id: object, timeout: float = 30.0) -> int:
    """Wait until the server's event persister (5 s flush) has written the run's terminal
    event, so events (payloads hold exception messages) are in the DB when it is scanned."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(f"file:{prefect_db_path()}?mode=ro", uri=True)
        try:
            n = conn.execute(
                "SELECT count(*) FROM events WHERE resource_id = ? AND event IN "
                "('prefect.flow-run.Completed', 'prefect.flow-run.Failed')",
                (f"prefect.flow-run.{flow_run_id}",)).fetchone()[0]
            total = conn.execute("SELECT count(*) FROM events WHERE resource_id = ? "
                                 "OR related_resource_ids LIKE ?",
                                 (f"prefect.flow-run.{flow_run_id}",
                                  f"%prefect.flow-run.{flow_run_id}%")).fetchone()[0]
        finally:
            conn.close()
        if n:
            return int(total)
        assert time.monotonic() < deadline, "the flow run's events never reached the DB"
        time.sleep(0.5)


def _paged(read: Callable[..., list[Any]], page: int = 200) -> Iterator[Any]:
    offset = 0
    while True:
        items = read(limit=page, offset=offset)
        yield from items
        if len(items) < page:
            return
        offset += page


def scan_prefect_api(needles: dict[str, bytes]) -> tuple[list[str], dict[str, int]]:
    """Read back every log, artifact, flow run and task run through the client."""
    from prefect.client.orchestration import get_client

    hits: list[str] = []
    seen = {"logs": 0, "artifacts": 0, "flow_runs": 0, "task_runs": 0}
    with get_client(sync_client=True) as client:
        for log in _paged(client.read_logs):
            seen["logs"] += 1
            hits += secret_scan.scan_text(log.message, needles, f"api log {log.id}")
        for art in _paged(client.read_artifacts):
            seen["artifacts"] += 1
            body = json.dumps([art.data, art.description, art.metadata_], default=str)
            hits += secret_scan.scan_text(body, needles, f"api artifact {art.key or art.id}")
        for run in _paged(client.read_flow_runs):
            seen["flow_runs"] += 1
            body = json.dumps([run.parameters, run.state.message if run.state else None,
                               run.name, run.tags], default=str)
            hits += secret_scan.scan_text(body, needles, f"api flow run {run.id}")
        for trun in _paged(client.read_task_runs):
            seen["task_runs"] += 1
            body = json.dumps([trun.state.message if trun.state else None, trun.name,
                               trun.task_inputs], default=str)
            hits += secret_scan.scan_text(body, needles, f"api task run {trun.id}")
    return hits, seen


def scan_everything(*, needles: dict[str, bytes], db_url: str | None, roots: list[Path],
                    exclude: set[Path], captured: str = "") -> tuple[list[str], dict[str, int]]:
    """The one scan used by the leak test and by the planted-key tests."""
    flush_prefect_logs()
    hits: list[str] = []
    stats: dict[str, int] = {}
    if db_url is not None:
        if db_url.startswith("sqlite"):
            inv = Path(db_url.split("///", 1)[1])
            hits += secret_scan.scan_sqlite(inv, needles)
            # The file (and its -wal/-shm) is also read as raw bytes by scan_tree below.
            assert inv.is_file()
        else:
            hits += secret_scan.scan_postgres(db_url, needles)
    pdb = prefect_db_path()
    hits += secret_scan.scan_sqlite(pdb, needles)
    hits += secret_scan.scan_tree(pdb.parent, needles, exclude)
    stats["prefect_db_files"] = len(secret_scan.files_under(pdb.parent, exclude))
    for root in roots:
        hits += secret_scan.scan_tree(root, needles, exclude)
        stats[f"files:{root.name}"] = len(secret_scan.files_under(root, exclude))
    api_hits, seen = scan_prefect_api(needles)
    hits += api_hits
    stats.update(seen)
    if captured:
        hits += secret_scan.scan_text(captured, needles, "captured test output")
    return hits, stats


def needle_names(hits: list[str]) -> set[str]:
    return {h.rsplit(": ", 1)[1] for h in hits}


def assert_no_secret_text(messages: list[str], needles: dict[str, bytes]) -> None:
    """Hit descriptions must name needles only, never hold any form of a secret."""
    for message in messages:
        assert not secret_scan.scan_text(message, needles, "hit message"), \
            "a hit description contains secret material"


# --- the leak test ---------------------------------------------------------------------------
def _tamper_guek(data: Path, row: int) -> str:
    """Flip one hex digit of the wrapped GUEK of data row ``row``; return that serial."""
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    header = lines[0].rstrip("\r\n").split(";")
    g, s = header.index("GUEK"), header.index("MeterNo")
    cells = lines[row + 1].rstrip("\r\n").split(";")
    ending = lines[row + 1][len(lines[row + 1].rstrip("\r\n")):]
    cells[g] = cells[g][:-1] + ("0" if cells[g][-1] != "0" else "1")
    lines[row + 1] = ";".join(cells) + ending
    data.write_text("".join(lines), encoding="utf-8")
    return cells[s].strip('"')


def test_factory_import_leaves_no_key_or_pin_anywhere(
        fleet, tmp_path: Path, session_dir: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> None:
    caplog.set_level(logging.DEBUG)
    # Prefect's non-propagating loggers too (their console output goes to a stream that
    # capsys may not own).
    for name in ("prefect", "prefect.extra", "prefect._internal"):
        logging.getLogger(name).addHandler(caplog.handler)
    request.addfinalizer(lambda: [logging.getLogger(n).removeHandler(caplog.handler)
                                  for n in ("prefect", "prefect.extra", "prefect._internal")])
    files = fleet.batch("acme", tmp_path / "batch", 30, suites=(0, 1, 2))
    _tamper_guek(files.data, 7)
    fleet.makers["acme"].resign(files.manifest)
    state = fleet.run(files, "acme")
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["imported"], summary["quarantined"], summary["records"]) == (29, 1, 30)
    events = wait_for_flow_run_events(state.state_details.flow_run_id)

    records = list(read_meter_secrets(files.secrets))
    assert {r["suite"] for r in records} == {0, 1, 2}
    needles = secret_scan.needles(records, fleet.settings.secrets_dir)
    assert len(needles) == 30 * 4 * 5 + 2

    settings = fleet.settings
    exclude = {files.secrets, session_dir / "manufacturers", settings.token_dir,
               settings.secrets_dir}
    out = capsys.readouterr()
    captured = out.out + out.err + caplog.text
    assert "factory-import" in captured, "the flow run's console output was not captured"
    home = prefect_home()
    roots = [tmp_path, session_dir] + ([] if home.is_relative_to(session_dir) else [home])
    hits, stats = scan_everything(
        needles=needles, db_url=fleet.db_url, exclude=exclude, captured=captured, roots=roots)
    # The scan looked at something real: the batch, Prefect's DB, the run's logs/artifacts.
    assert stats["prefect_db_files"] >= 1 and stats[f"files:{tmp_path.name}"] >= 2
    assert stats["logs"] > 0 and stats["artifacts"] > 0 and stats["flow_runs"] > 0
    assert events > 0
    assert_no_secret_text(hits, needles)
    assert hits == [], "secret material found:\n" + "\n".join(sorted(set(hits)))


# --- the scan can fail -----------------------------------------------------------------------
def _synthetic_batch(manufacturers, out: Path):  # type: ignore[no-untyped-def]
    """A real simulator batch (its keys are what gets planted), no import needed."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    mapping = Path(__file__).resolve().parents[3] / "simulator" / "mappings" / "acme.toml"
    return manufacturers["acme"].make_batch(
        out=out, mapping_path=mapping, import_public_pem=pem, oaep_hash="sha256", count=2,
        serial_start=900_000 + int(uuid.uuid4().int % 1_000_000))


def _plant_inventory(db_url: str, text: str) -> None:
    from sqlalchemy import text as sql

    from lifecycle.inventory import db

    engine = db.make_engine(db_url)
    try:
        db.migrate(engine)
        with engine.begin() as conn:  # plain SQL: meterkeys refuses such a name itself
            conn.execute(sql("INSERT INTO principal (name, role, disabled, created_at) "
                             "VALUES (:name, 'auditor', false, CURRENT_TIMESTAMP)"),
                         {"name": f"planted-{text}"})
    finally:
        engine.dispose()


def _plant_log(text: str) -> None:
    from prefect import flow, get_run_logger

    @flow(name="plant-log")
    def plant() -> None:
        get_run_logger().info("planted %s", text)

    plant()


def _plant_artifact(text: str) -> None:
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact

    @flow(name="plant-artifact")
    def plant() -> None:
        create_markdown_artifact(markdown=f"# planted\n{text}", key="planted-key")

    plant()


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    from tests.conftest import pg_schema

    with pg_schema() as url:
        yield url


PLACES = ["inventory-sqlite", "inventory-postgres", "prefect-log", "prefect-artifact",
          "prefect-home-base64-file", "prefect-home-result-json"]


@pytest.mark.parametrize("place", PLACES)
def test_scan_finds_a_key_planted_on_purpose(place: str, manufacturers, tmp_path: Path,
                                             session_dir: Path,
                                             request: pytest.FixtureRequest) -> None:
    files = _synthetic_batch(manufacturers, tmp_path / "batch")
    records = list(read_meter_secrets(files.secrets))
    needles = secret_scan.needles(records)
    victim = records[1]
    key = bytes.fromhex(victim["gak"])
    home = prefect_home()
    db_url: str | None = None
    expected_where: str
    if place == "inventory-sqlite":
        db_url = f"sqlite:///{tmp_path / 'inventory.db'}"
        _plant_inventory(db_url, key.hex())
        expect, expected_where = "hex-lower", "sqlite inventory.db:principal"
    elif place == "inventory-postgres":
        db_url = request.getfixturevalue("pg_schema_url")
        _plant_inventory(db_url, key.hex().upper())
        expect, expected_where = "hex-upper", "pg_dump --schema="
    elif place == "prefect-log":
        _plant_log(key.hex())
        expect, expected_where = "hex-lower", "api log "
    elif place == "prefect-artifact":
        _plant_artifact(key.hex().upper())
        expect, expected_where = "hex-upper", "api artifact planted-key"
    elif place == "prefect-home-base64-file":
        planted = home / "logs" / f"planted-{uuid.uuid4().hex}.log"
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(b"token=" + base64.b64encode(key) + b"\n")
        request.addfinalizer(lambda: planted.unlink(missing_ok=True))
        expect, expected_where = "base64", str(planted)
    else:  # a result file as Prefect writes it: {"metadata":..., "result": base64(pickle)}
        import pickle

        planted = home / "storage" / uuid.uuid4().hex
        planted.parent.mkdir(parents=True, exist_ok=True)
        payload = base64.b64encode(pickle.dumps({"wrapped": b"x", "key": key})).decode()
        planted.write_text(json.dumps({"metadata": {"serializer": {"type": "pickle"}},
                                       "result": payload}), encoding="utf-8")
        request.addfinalizer(lambda: planted.unlink(missing_ok=True))
        expect, expected_where = "raw", f"{planted} [json.result(base64)]"
    exclude = {files.secrets, session_dir / "manufacturers"}
    roots = [tmp_path, home] if db_url is None else [tmp_path]
    hits, _ = scan_everything(needles=needles, db_url=db_url, roots=roots, exclude=exclude)
    wanted = f"{victim['serial']}.gak/{expect}"
    # Forms that happen to coincide (base64 without +/ equals urlsafe base64) count as one.
    same = {n for n, v in needles.items() if v == needles[wanted]}
    assert needle_names(hits) == same, sorted(needle_names(hits))
    assert any(h.startswith(expected_where) and h.endswith(": " + wanted) for h in hits), hits
    assert_no_secret_text(hits, needles)
    for form in needles.values():
        assert all(form not in h.encode() for h in hits)


def test_needles_cover_every_encoding_and_the_pins(settings) -> None:  # type: ignore[no-untyped-def]
    key = os.urandom(16)
    rec = {"serial": "ACM0000000001", "system_title": "00", "suite": 0,
           "guek": key.hex().upper(), "gbek": os.urandom(16).hex(), "gak": os.urandom(16).hex(),
           "kek": os.urandom(32).hex()}
    found = secret_scan.needles([rec], settings.secrets_dir)
    pin = (settings.secrets_dir / "user.pin").read_text(encoding="utf-8").strip().encode()
    for blob, name in [(key, "raw"), (key.hex().encode(), "hex-lower"),
                       (key.hex().upper().encode(), "hex-upper"),
                       (base64.b64encode(key), "base64"),
                       (base64.urlsafe_b64encode(key), "base64-urlsafe")]:
        hits = secret_scan.scan_bytes(b"..." + blob + b"...", found, "blob")
        assert f"blob: ACM0000000001.guek/{name}" in hits
        assert_no_secret_text(hits, found)
    assert secret_scan.scan_bytes(b"PIN=" + pin, found, "cfg") == ["cfg: pin:user.pin"]
    assert secret_scan.scan_bytes(b"nothing here", found, "cfg") == []
