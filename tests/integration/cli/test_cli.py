"""The meterkeys command line, run in-process against the session token and a test inventory."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from cli.main import app
from lifecycle.inventory import db, meters

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def run(fleet, monkeypatch):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def invoke(principal: str, *args: str):  # type: ignore[no-untyped-def]
        monkeypatch.setenv("METERKEYS_PRINCIPAL", principal)
        from tasks import context

        context.settings.cache_clear()
        return runner.invoke(app, list(args))

    return invoke


# The command line is the same on both databases: it runs once, on the embedded default.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_import_list_show_and_verify(fleet, run, tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 12, suites=(0, 1))
    result = run("test-operator", "import", str(files.data), "--vendor", "acme", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "12 meters imported, 0 rows quarantined, of 12" in result.output
    listed = run("test-operator", "meters", "list", "--limit", "5")
    assert listed.exit_code == 0 and "12 meters" in listed.output
    shown = run("test-auditor", "meters", "show", "ACM0000000001")
    assert shown.exit_code == 0
    key_rows = [line for line in shown.output.splitlines()
                if line.startswith("│") and "│ factory │" in line]
    assert [row.split("│")[1].strip() for row in key_rows] == ["GUEK", "GBEK", "GAK", "KEK"]
    assert "factory certificate: no" in shown.output  # suite 0
    verified = run("test-auditor", "audit", "verify")
    assert verified.exit_code == 0, verified.output
    # Alter one event: verify now fails with exit code 2 and names it.
    with fleet.engine.begin() as conn:
        conn.execute(text("UPDATE audit_event SET outcome = 'ok!' WHERE seq = 5"))
    broken = run("test-auditor", "audit", "verify")
    assert broken.exit_code == 2
    assert "event 5" in broken.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_roles_are_enforced_on_the_command_line(fleet, run, tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 3)
    refused = run("test-auditor", "import", str(files.data), "--vendor", "acme")
    assert refused.exit_code == 1
    assert "may not perform 'batch.import'" in refused.output
    unknown = run("mallory", "meters", "list")
    assert unknown.exit_code == 1 and "'mallory' (role none)" in unknown.output
    with db.transaction(fleet.engine) as session:
        assert meters.count_meters(session) == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_inventory_verify_names_a_swapped_blob(fleet, run, tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 4)
    assert run("test-operator", "import", str(files.data), "--vendor", "acme",
               "--workers", "0").exit_code == 0
    good = run("test-auditor", "inventory", "verify")
    assert good.exit_code == 0, good.output
    assert "16 key blobs verified" in good.output
    assert run("test-operator", "inventory", "verify").exit_code == 1  # operators may not
    # A writer of the database swaps the GAK blobs (and MACs) of two meters.
    with fleet.engine.begin() as conn:
        rows = conn.execute(text(
            "SELECT kv.id, kv.blob, kv.mac, m.serial FROM key_version kv JOIN meter m "
            "ON m.id = kv.meter_id WHERE kv.key_id = 2 ORDER BY m.serial LIMIT 2")).all()
        for (row_id, *_), (_, blob, mac, _) in zip(rows, reversed(rows), strict=True):
            conn.execute(text("UPDATE key_version SET blob = :b, mac = :m WHERE id = :i"),
                         {"b": blob, "m": mac, "i": row_id})
    bad = run("test-auditor", "inventory", "verify")
    assert bad.exit_code == 2
    assert "2 of 16 key blobs fail" in bad.output
    assert rows[0].serial in bad.output and rows[1].serial in bad.output
