"""The meterkeys command line, run in-process against the session token and a test inventory."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from cli.main import app
from lifecycle import principals
from lifecycle.clock import utcnow
from lifecycle.inventory import db, meters, vendors

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def run(fleet, monkeypatch):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def invoke(principal: str, *args: str):  # type: ignore[no-untyped-def]
        """Run a command with ``principal``'s key (an unenrolled key for an unknown name)."""
        if not fleet.ids.key_path(principal).exists():
            fleet.ids.keygen(principal)
        monkeypatch.setenv("METERKEYS_PRINCIPAL_KEY", str(fleet.ids.key_path(principal)))
        from cli import common
        from tasks import context

        context.settings.cache_clear()
        common.signer.cache_clear()
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
    unknown = run("mallory", "import", str(files.data), "--vendor", "acme")
    assert unknown.exit_code == 1 and "no enrolled principal holds this key" in unknown.output
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


def _request_id(output: str) -> str:
    match = re.search(r"request (R-[A-Z2-7]+)", output)
    assert match, output
    return match.group(1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_security_officer_action_waits_for_a_second_officer(fleet, run, tmp_path: Path,
                                                              manufacturers) -> None:
    """README "Identity": `vendor add` by one officer leaves a request; the same officer, an
    operator, or a request whose parameters were edited in the database cannot complete it;
    a second officer's `meterkeys approve` performs it."""
    key = tmp_path / "signing.pem"
    key.write_text(manufacturers["acme"].signing_public_pem(), encoding="utf-8")
    mapping = Path(__file__).resolve().parents[3] / "simulator" / "mappings" / "acme.toml"
    asked = run("test-so", "vendor", "add", "newco", "--signing-key", str(key),
                "--mapping", str(mapping))
    assert asked.exit_code == 0, asked.output
    request_id = _request_id(asked.output)
    with db.transaction(fleet.engine) as session:
        assert "newco" not in {v.name for v in vendors.list_vendors(session)}
    same = run("test-so", "approve", request_id, "--yes")
    assert same.exit_code == 1 and "second security officer" in same.output
    operator = run("test-operator", "approve", request_id, "--yes")
    assert operator.exit_code == 1 and "may not perform 'vendor.add'" in operator.output
    approved = run("test-so-2", "approve", request_id, "--yes")
    assert approved.exit_code == 0, approved.output
    assert "vendor newco added" in approved.output
    again = run("test-so-2", "approve", request_id, "--yes")
    assert again.exit_code == 1 and "not pending" in again.output
    with db.transaction(fleet.engine) as session:
        assert "newco" in {v.name for v in vendors.list_vendors(session)}
    # An edited pending request (a database writer changes the vendor's signing key).
    second = run("test-so", "vendor", "add", "otherco", "--signing-key", str(key),
                 "--mapping", str(mapping))
    other_id = _request_id(second.output)
    with fleet.engine.begin() as conn:
        conn.execute(text("UPDATE pending_request SET params = replace(params, 'otherco', "
                          "'evilco') WHERE id = :id"), {"id": other_id})
    edited = run("test-so-2", "approve", other_id, "--yes")
    assert edited.exit_code == 1 and "parameters differ" in edited.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_principals_are_enrolled_by_two_officers_and_listed(fleet, run, tmp_path: Path) -> None:
    made = run("test-operator", "principal", "keygen", "nina", "--out", str(tmp_path),
               "--no-passphrase")
    assert made.exit_code == 0, made.output
    public = tmp_path / "nina.pub.pem"
    asked = run("test-so", "principal", "enrol", "nina", "--role", "operator",
                "--public-key", str(public))
    assert run("test-so-2", "approve", _request_id(asked.output), "--yes").exit_code == 0
    listed = run("test-auditor", "principal", "list")
    assert listed.exit_code == 0
    nina = [line for line in listed.output.splitlines() if "│ nina" in line]
    assert nina and "operator" in nina[0] and "verified" in nina[0]
    shutil.copy(tmp_path / "nina.key.pem", fleet.ids.key_path("nina"))
    who = run("nina", "principal", "whoami")
    assert who.exit_code == 0 and "nina (operator)" in who.output, who.output
    stranger = run("mallory", "principal", "whoami")
    assert stranger.exit_code == 1 and "no enrolled principal" in stranger.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_audit_verify_names_a_principal_re_enabled_by_sql(fleet, run) -> None:
    """An inventory writer clears the `disabled` flag (and the signed disabling) of a principal
    two officers disabled: `audit verify` names it, from the witnessed trail."""
    fleet.ids.enrol("ivan", "operator")
    signed = [fleet.ids.sign(who, "principal.disable", {"name": "ivan"})
              for who in ("test-so", "test-so-2")]
    principals.disable(fleet.engine, fleet.settings, signed, "ivan", at=utcnow())
    assert run("test-auditor", "audit", "verify").exit_code == 0
    with fleet.engine.begin() as conn:
        conn.execute(text("UPDATE principal SET disabled = false, disabled_by = NULL "
                          "WHERE name = 'ivan'"))
    broken = run("test-auditor", "audit", "verify")
    assert broken.exit_code == 2, broken.output
    assert "principal 'ivan': enabled, but the audit trail disabled it" in broken.output
