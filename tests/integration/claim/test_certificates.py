"""The claim's two certificate steps: factory credentials verified before a suite 1/2 meter is
claimed, and operational certificates issued from the meter's requests after it is."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select, update

from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.inventory import certificates, claims, db, meters
from lifecycle.inventory.audit_events import AuditEvent
from lifecycle.pki import ceremony
from lifecycle.pki import steps as pki_steps
from simulator.hes import SimulatedHes

from .conftest import officers

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


def suites_of(engine) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with db.transaction(engine) as session:
        return {m.serial: m.suite for m in meters.list_meters(session, limit=10_000)}


def events(engine, action: str) -> list[tuple[str, str | None, dict]]:  # type: ignore[no-untyped-def,type-arg]
    with db.transaction(engine) as session:
        rows = session.execute(select(AuditEvent).where(AuditEvent.action == action)).scalars()
        return [(r.outcome, r.meter_serial, json.loads(r.detail)) for r in rows]


def run_ceremony(fleet) -> Actor:  # type: ignore[no-untyped-def]
    actor = officers(fleet, "pki.ceremony", {"renew": []})
    ceremony.ceremony(fleet.settings, fleet.engine, actor)
    return actor


def test_meters_whose_factory_credentials_do_not_verify_are_not_claimed(  # type: ignore[no-untyped-def]
        claim_fleet, tmp_path: Path) -> None:
    fleet = claim_fleet.fleet
    suites = suites_of(claim_fleet.engine)
    forged = next(s for s, n in suites.items() if n == 1)
    # A certificate for the meter's own key and title, made by another manufacturer's CA.
    with db.transaction(claim_fleet.engine) as session:
        meter = meters.get_meter(session, forged)
        real = x509.load_der_x509_certificate(base64.b64decode(meter.factory_certificate or ""))
        title = meter.system_title
    public = real.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    other = fleet.makers["cygnus"]._cas[1].issue(public, "acme", forged, title, utcnow())
    with db.transaction(claim_fleet.engine) as session:
        session.execute(update(meters.Meter).where(meters.Meter.serial == forged).values(
            factory_certificate=base64.b64encode(other).decode()))
    # A vendor with no registered factory CA: its suite 1 meters are not claimed either.
    files = fleet.batch("cygnus", tmp_path / "cygnus", 2, suites=(1,))
    assert fleet.run(files, "cygnus").is_completed()
    SimulatedHes.open(claim_fleet.hes_dir, [files.secrets], engine="cryptography")
    cygnus = [s for s in suites_of(claim_fleet.engine) if s not in suites]

    state = claim_fleet.run(serials=[*suites, *cygnus])
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["claimed"]) == set(suites) - {forged}
    assert set(result["failed"]) == {forged, *cygnus}
    assert "not signed by a registered factory CA" in result["failed"][forged]
    for serial in cygnus:
        assert "no registered factory CA" in result["failed"][serial]
    with db.transaction(claim_fleet.engine) as session:
        for serial in [forged, *cygnus]:
            meter = meters.get_meter(session, serial)
            assert meter.state == "registered"
            assert {k.state for k in meters.key_versions(session, int(meter.id or 0))} == \
                {"active"}
    refused = {serial: detail["reason"] for outcome, serial, detail in
               events(claim_fleet.engine, "claim.prepare") if outcome == "refused"}
    assert refused == {s: result["failed"][s] for s in [forged, *cygnus]}


def test_claimed_meters_get_two_operational_certificates_each(  # type: ignore[no-untyped-def]
        claim_fleet, tmp_path: Path) -> None:
    fleet = claim_fleet.fleet
    run_ceremony(fleet)
    suites = suites_of(claim_fleet.engine)
    certified = sorted(s for s, n in suites.items() if n in (1, 2))
    flawed = certified[0]
    hes = claim_fleet.hes()
    hes.meters[flawed].csr_flaw = "wrong_subject"
    hes.save()

    state = claim_fleet.run(vendor="acme", workers=2)
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["claimed"]) == set(suites)
    assert set(result["certified"]) == set(certified) - {flawed}
    assert set(result["uncertified"]) == {flawed}
    assert "is not CN=" in result["uncertified"][flawed]

    out = tmp_path / "export"
    pki_steps.export(claim_fleet.engine, out)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join((out / f).read_bytes() for f in
                               ("root-1.pem", "device-p256-1.pem", "device-p384-1.pem")))
    hes = claim_fleet.hes()
    logged = {serial: detail for outcome, serial, detail in
              events(claim_fleet.engine, "claim.certify") if outcome == "ok"}
    for serial in set(certified) - {flawed}:
        held = hes.meters[serial].certificates
        assert set(held) == {"signature", "key_agreement"}, serial
        numbers = set()
        for usage, der_hex in held.items():
            der = bytes.fromhex(der_hex)
            path = tmp_path / f"{serial}-{usage}.pem"
            path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(
                serialization.Encoding.PEM))
            done = subprocess.run(["openssl", "verify", "-CAfile", str(chain), str(path)],
                                  capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            cert = x509.load_der_x509_certificate(der)
            (name,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            assert name.value == hes.meters[serial].system_title.hex().upper()
            numbers.add(cert.serial_number)
            with db.transaction(claim_fleet.engine) as session:
                record = certificates.get_issued(session, str(cert.serial_number))
                assert record is not None and record.meter_serial == serial
        # Audited with the serials in decimal (JSON integers).
        assert {logged[serial]["signature_serial"],
                logged[serial]["agreement_serial"]} == numbers
    assert hes.meters[flawed].certificates == {}
    with db.transaction(claim_fleet.engine) as session:
        ids = [int(meters.get_meter(session, s).id or 0) for s in certified]
        orders = claims.certificate_orders_of(session, ids)
        issued = certificates.count_issued(session)
    assert sorted(o.status for v in orders.values() for o in v) == \
        ["delivered"] * (len(certified) - 1)

    # The next run certifies the meter once it asks properly, and nothing twice.
    hes.meters[flawed].csr_flaw = ""
    hes.save()
    again = claim_fleet.run(vendor="acme").result()
    assert again["claimed"] == [] and again["certified"] == [flawed]
    assert set(claim_fleet.hes().meters[flawed].certificates) == {"signature", "key_agreement"}
    with db.transaction(claim_fleet.engine) as session:
        assert certificates.count_issued(session) == issued + 2


def test_certificates_issued_but_not_delivered_are_delivered_by_the_next_run(  # type: ignore[no-untyped-def]
        claim_fleet, monkeypatch) -> None:
    run_ceremony(claim_fleet.fleet)
    suites = suites_of(claim_fleet.engine)
    certified = {s for s, n in suites.items() if n in (1, 2)}

    def lost(self, orders):  # type: ignore[no-untyped-def]
        raise OSError("the HES went away")

    monkeypatch.setattr(SimulatedHes, "import_certificates", lost)
    state = claim_fleet.run(vendor="acme")
    assert state.is_failed()
    monkeypatch.undo()
    with db.transaction(claim_fleet.engine) as session:
        issued = certificates.count_issued(session)
    assert issued == 2 * len(certified)
    result = claim_fleet.run(vendor="acme").result()
    assert set(result["certified"]) == certified
    with db.transaction(claim_fleet.engine) as session:
        assert certificates.count_issued(session) == issued  # the same certificates
    hes = claim_fleet.hes()
    assert all(len(hes.meters[s].certificates) == 2 for s in certified)


def test_uncertified_meters_are_operational_suite_1_2_meters_without_a_delivered_order(  # type: ignore[no-untyped-def]
        claim_fleet) -> None:
    """What a claim run certifies at its end: written by plain SQL, the states it must see."""
    from lifecycle.claim import certification
    from lifecycle.claim.steps import Selection

    run_ceremony(claim_fleet.fleet)
    state = claim_fleet.run(vendor="acme")
    assert state.is_completed(), state.message
    engine, selection = claim_fleet.engine, Selection(vendor="acme")
    assert certification.select_uncertified(engine, selection) == []
    suites = suites_of(engine)
    pending, lost, moved = sorted(s for s, n in suites.items() if n in (1, 2))[:3]
    plain = next(s for s, n in suites.items() if n == 0)
    with db.transaction(engine) as session:
        ids = {m.serial: int(m.id or 0) for m in meters.list_meters(session, limit=100)}
        orders = claims.CertificateOrder.__table__
        session.execute(update(orders).where(orders.c.meter_id == ids[pending])
                        .values(status="pending"))
        session.execute(orders.delete().where(orders.c.meter_id.in_([ids[lost], ids[plain]])))
        session.execute(update(meters.Meter.__table__).where(
            meters.Meter.__table__.c.id == ids[moved]).values(state="retired"))
    assert certification.select_uncertified(engine, selection) == [ids[pending], ids[lost]]
