"""meterkeys pki and vendor add-ca on the command line, in-process, on the embedded default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from cli.main import app
from lifecycle.clock import utcnow
from lifecycle.pki import profiles, steps
from lifecycle.pki.issuing import DeviceRequest


@pytest.fixture
def run(fleet, monkeypatch):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def invoke(principal: str, *args: str):  # type: ignore[no-untyped-def]
        monkeypatch.setenv("METERKEYS_PRINCIPAL_KEY", str(fleet.ids.key_path(principal)))
        from cli import common
        from tasks import context

        context.settings.cache_clear()
        common.signer.cache_clear()
        return runner.invoke(app, list(args))

    return invoke


def _request_id(output: str) -> str:
    match = re.search(r"request (R-[A-Z2-7]+)", output)
    assert match, output
    return match.group(1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ceremony_export_revoke_crl_and_add_ca(fleet, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    asked = run("test-so", "pki", "ceremony")
    assert asked.exit_code == 0, asked.output
    request_id = _request_id(asked.output)
    assert run("test-so", "approve", request_id, "--yes").exit_code == 1  # one officer alone
    done = run("test-so-2", "approve", request_id, "--yes")
    assert done.exit_code == 0, done.output
    said = " ".join(done.output.split())
    assert "ceremony done" in said and "device-p384 (generation 1)" in said
    listed = run("test-auditor", "pki", "list")
    assert listed.exit_code == 0 and "maintenance" in listed.output

    (cert,) = steps.issue(fleet.settings, fleet.engine, _actor(), profiles.DEVICE_P256, [
        DeviceRequest("4D4B530000000041", ec.generate_private_key(ec.SECP256R1()).public_key()
                      .public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo),
                      profiles.SIGNATURE)], utcnow())
    denied = run("test-operator", "pki", "revoke", str(cert.serial), "--reason", "superseded")
    assert denied.exit_code == 1 and "may not perform 'pki.revoke'" in " ".join(
        denied.output.split())
    hexed = f"0x{cert.serial:x}"
    revoked = run("test-so", "pki", "revoke", hexed, "--reason", "superseded")
    assert revoked.exit_code == 0, revoked.output
    crl = run("test-operator", "pki", "crl", "device-p256")
    assert crl.exit_code == 0, crl.output
    assert "CRL 1 of device-p256 generation 1: 1 revoked" in " ".join(crl.output.split())
    exported = run("test-auditor", "pki", "export", str(tmp_path / "out"))
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "out" / "device-p256-1.crl.pem").read_bytes().startswith(
        b"-----BEGIN X509 CRL-----")
    (tmp_path / "field.der").write_bytes(cert.der)  # the revoked device certificate, as DER
    checked = run("test-auditor", "pki", "check", str(tmp_path / "field.der"))
    assert checked.exit_code == 1 and checked.output.startswith("revoked"), checked.output
    ca = run("test-auditor", "pki", "check", str(tmp_path / "out" / "device-p256-1.pem"))
    assert ca.exit_code == 0 and ca.output.startswith("ca"), ca.output
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n", encoding="ascii")
    junk = run("test-auditor", "pki", "check", str(tmp_path / "junk.pem"))
    assert junk.exit_code != 0 and "not an X.509 certificate" in junk.output, junk.output

    pem = tmp_path / "acme-ca.pem"
    pem.write_text(fleet.makers["acme"].factory_ca_pem(1), encoding="ascii")
    add = run("test-so", "vendor", "add-ca", "acme", "--certificate", str(pem))
    approved = run("test-so-2", "approve", _request_id(add.output), "--yes")
    assert approved.exit_code == 0, approved.output
    assert "registered for vendor acme" in " ".join(approved.output.split())
    assert len(steps.factory_cas(fleet.engine, fleet.settings, "acme")) == 1


def _actor():  # type: ignore[no-untyped-def]
    from lifecycle.installation.steps import UNATTENDED

    return UNATTENDED
