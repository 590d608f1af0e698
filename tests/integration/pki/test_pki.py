"""The PKI on the real SoftHSM2 token: ceremony, device certificates, CRLs, checked with the
openssl binary and pkilint; the CA keys' protections; the root token kept from online processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle import principals
from lifecycle.clock import utcnow
from lifecycle.errors import AccessDenied, InventoryError, PkiError
from lifecycle.inventory import certificates, hsm_keys
from lifecycle.inventory.db import transaction
from lifecycle.pki import ceremony, profiles, steps
from lifecycle.pki.issuing import DeviceRequest
from tests.identities import ROOT

from .conftest import Pki, officers_authorize

BIN = Path(sys.executable).parent
LINT_FAIL = {"ERROR", "FATAL"}


def _spki(curve: ec.EllipticCurve) -> bytes:
    return ec.generate_private_key(curve).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issue(pki: Pki, ca: str, curve: ec.EllipticCurve, titles: list[str]) -> list:  # type: ignore[type-arg]
    requests = [DeviceRequest(t, _spki(curve), profiles.USAGES[i % 2], f"M{t}")
                for i, t in enumerate(titles)]
    return steps.issue(pki.fleet.settings, pki.fleet.engine, pki.actor, ca,  # type: ignore[attr-defined]
                       requests, utcnow())


def _pem(der: bytes, path: Path) -> Path:
    path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(
        serialization.Encoding.PEM))
    return path


def test_the_ceremony_makes_the_root_and_every_sub_ca(pki: Pki) -> None:
    engine = pki.fleet.engine  # type: ignore[attr-defined]
    assert pki.report.made == {name: 1 for name in profiles.CAS}
    with transaction(engine) as db:
        cas = {r.ca_name: r for r in certificates.ca_certificates(db)}
        pins = {p.role for p in hsm_keys.all_pins(db)}
        crl = certificates.last_crl(db, profiles.ROOT, 1)
    root = x509.load_der_x509_certificate(cas["root"].der)
    for name in profiles.ONLINE:
        x509.load_der_x509_certificate(cas[name].der).verify_directly_issued_by(root)
        assert profiles.key_role(name, 1) in pins
    assert profiles.key_role("root", 1) not in pins  # the root key is on its own token
    assert crl is not None and crl.number == 1
    # Run again: nothing is due, the root's CRL number moves on.
    again = ceremony.ceremony(pki.fleet.settings, engine, pki.actor)  # type: ignore[attr-defined]
    assert again.made == {} and again.crl_number == 2 and not again.root_token_created


def test_the_ceremony_refuses_one_officer_alone(fleet) -> None:  # type: ignore[no-untyped-def]
    params: dict[str, list[str]] = {"renew": []}
    with pytest.raises(AccessDenied, match="two|second|dual"):
        principals.authorize(fleet.engine, fleet.settings,
                             [fleet.ids.sign(ROOT, "pki.ceremony", params)], "pki.ceremony",
                             params, at=utcnow())


def test_openssl_accepts_a_valid_device_certificate_and_rejects_a_revoked_one(
        pki: Pki, tmp_path: Path) -> None:
    fleet = pki.fleet
    good, bad = _issue(pki, "device-p256", ec.SECP256R1(), ["4D4B530000000001",
                                                           "4D4B530000000002"])
    (suite2,) = _issue(pki, "device-p384", ec.SECP384R1(), ["4D4B530000000003"])
    steps.revoke(fleet.engine, pki.actor, bad.serial, "key-compromise", utcnow())  # type: ignore[attr-defined]
    first = steps.issue_crl(fleet.settings, fleet.engine, pki.actor, "device-p256", utcnow())  # type: ignore[attr-defined]
    second = steps.issue_crl(fleet.settings, fleet.engine, pki.actor, "device-p256", utcnow())  # type: ignore[attr-defined]
    assert [c.number for c in first + second] == [1, 2] and second[0].revoked == 1
    steps.issue_crl(fleet.settings, fleet.engine, pki.actor, "device-p384", utcnow())  # type: ignore[attr-defined]
    out = tmp_path / "export"
    steps.export(fleet.engine, out)  # type: ignore[attr-defined]
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join((out / f).read_bytes() for f in
                               ("root-1.pem", "device-p256-1.pem", "device-p384-1.pem")))
    crls = tmp_path / "crls.pem"
    crls.write_bytes(b"".join((out / f).read_bytes() for f in
                              ("root-1.crl.pem", "device-p256-1.crl.pem",
                               "device-p384-1.crl.pem")))

    def verify(der: bytes, name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "verify", "-CAfile", str(chain), "-crl_check_all",
                               "-CRLfile", str(crls), str(_pem(der, tmp_path / name))],
                              capture_output=True, text=True, check=False)

    for cert, name in ((good, "good.pem"), (suite2, "suite2.pem")):
        result = verify(cert.der, name)
        assert result.returncode == 0, result.stdout + result.stderr
    revoked = verify(bad.der, "bad.pem")
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr


def _lint(command: list[str], path: Path) -> list[str]:
    result = subprocess.run([str(BIN / command[0]), "lint", *command[1:], "-f", "JSON",
                             str(path)], capture_output=True, text=True, check=False)
    assert result.stdout, result.stderr
    return [f"{r['validator']}: {f['code']} ({f['severity']})"
            for r in json.loads(result.stdout)["results"] for f in r["finding_descriptions"]
            if f["severity"] in LINT_FAIL]


def test_pkilint_finds_no_error_in_any_certificate_or_crl(pki: Pki, tmp_path: Path) -> None:
    fleet = pki.fleet
    issued = _issue(pki, "device-p256", ec.SECP256R1(), ["4D4B530000000011",
                                                        "4D4B530000000012"])
    steps.revoke(fleet.engine, pki.actor, issued[1].serial, "superseded", utcnow())  # type: ignore[attr-defined]
    steps.issue_crl(fleet.settings, fleet.engine, pki.actor, "device-p256", utcnow())  # type: ignore[attr-defined]
    out = tmp_path / "export"
    steps.export(fleet.engine, out)  # type: ignore[attr-defined]
    certs = [out / f"{name}-1.pem" for name in profiles.CAS]
    certs += [_pem(c.der, tmp_path / f"device-{c.usage}.pem") for c in issued]
    findings = {path.name: _lint(["lint_pkix_cert"], path) for path in certs}
    for crl in ("root-1.crl.pem", "device-p256-1.crl.pem"):
        findings[crl] = _lint(["lint_crl", "-t", "CRL", "-p", "PKIX"], out / crl)
    assert {name: f for name, f in findings.items() if f} == {}
    assert {c.usage for c in issued} == {profiles.SIGNATURE, profiles.KEY_AGREEMENT}


def test_the_root_crl_is_the_ceremony_s(pki: Pki) -> None:
    with pytest.raises(PkiError, match="ceremony"):
        steps.issue_crl(pki.fleet.settings, pki.fleet.engine, pki.actor, "root", utcnow())  # type: ignore[attr-defined]
    with pytest.raises(PkiError, match="offline"):
        steps.issuer(pki.fleet.settings, pki.fleet.engine, "root")  # type: ignore[attr-defined]


def test_revoking_twice_or_an_unknown_serial_is_refused(pki: Pki) -> None:
    (cert,) = _issue(pki, "maintenance", ec.SECP256R1(), ["4D4B530000000021"])
    engine = pki.fleet.engine  # type: ignore[attr-defined]
    steps.revoke(engine, pki.actor, cert.serial, "cessation-of-operation", utcnow())
    with pytest.raises(InventoryError, match="revoked already"):
        steps.revoke(engine, pki.actor, cert.serial, "key-compromise", utcnow())
    with pytest.raises(InventoryError, match="no certificate"):
        steps.revoke(engine, pki.actor, 12345, "key-compromise", utcnow())
    with pytest.raises(PkiError, match="reason"):
        steps.revoke(engine, pki.actor, cert.serial, "bored", utcnow())


def test_a_renewed_ca_keeps_its_old_certificates_valid(pki: Pki, tmp_path: Path) -> None:
    fleet = pki.fleet
    (old,) = _issue(pki, "device-p256", ec.SECP256R1(), ["4D4B530000000031"])
    actor = officers_authorize(fleet, "pki.ceremony", {"renew": ["device-p256"]})
    report = ceremony.ceremony(fleet.settings, fleet.engine, actor, renew=["device-p256"])  # type: ignore[attr-defined]
    assert report.made == {"device-p256": 2}
    (new,) = _issue(pki, "device-p256", ec.SECP256R1(), ["4D4B530000000032"])
    made = steps.issue_crl(fleet.settings, fleet.engine, pki.actor, "device-p256", utcnow())  # type: ignore[attr-defined]
    assert [(c.generation, c.number) for c in made] == [(1, 1), (2, 1)]
    with transaction(fleet.engine) as db:  # type: ignore[attr-defined]
        statuses = [(r.generation, r.status) for r in
                    certificates.ca_certificates(db, "device-p256")]
    assert statuses == [(1, "retired"), (2, "active")]
    out = tmp_path / "export"
    steps.export(fleet.engine, out)  # type: ignore[attr-defined]
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join((out / f).read_bytes() for f in
                               ("root-1.pem", "device-p256-1.pem", "device-p256-2.pem")))
    crls = tmp_path / "crls.pem"
    crls.write_bytes(b"".join((out / f).read_bytes() for f in
                              ("root-1.crl.pem", "device-p256-1.crl.pem",
                               "device-p256-2.crl.pem")))
    for cert, name in ((old, "old.pem"), (new, "new.pem")):
        result = subprocess.run(["openssl", "verify", "-CAfile", str(chain), "-crl_check_all",
                                 "-CRLfile", str(crls), str(_pem(cert.der, tmp_path / name))],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    assert x509.load_der_x509_certificate(new.der).issuer != \
        x509.load_der_x509_certificate(old.der).issuer


def test_an_online_process_cannot_open_the_root_token(pki: Pki) -> None:
    """The online settings (main token PIN, no root PIN) pointed at the root token fail to log
    in, in a fresh process that sees the root token."""
    settings = pki.fleet.settings  # type: ignore[attr-defined]
    env = {**os.environ, "METERKEYS_HOME": str(settings.home), "METERKEYS_TOKEN_LABEL":
           settings.root_token_label}
    code = ("from lifecycle.config import load_settings\n"
            "from lifecycle.hsm.connection import Hsm\n"
            "Hsm.open(load_settings())\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode != 0
    assert "PinIncorrect" in result.stderr, result.stderr[-2000:]


ROOT_PIN_NAMES = ("root_pin_file", "root_so_pin_file", "root-user.pin", "root-so.pin",
                  "root_token_settings")


def test_only_the_ceremony_names_the_root_pin() -> None:
    project = Path(__file__).resolve().parents[3]
    naming = set()
    for package in ("lifecycle", "cli", "tasks", "flows", "deployments", "simulator"):
        for path in (project / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if any(name in text for name in ROOT_PIN_NAMES):
                naming.add(str(path.relative_to(project)))
    assert naming == {"lifecycle/config.py", "lifecycle/pki/ceremony.py"}
