"""Vendors' factory CAs registered under dual control, and a batch's factory certificates
verified against them."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest

from lifecycle import principals
from lifecycle.clock import utcnow
from lifecycle.errors import AccessDenied, FactoryTrustError, InventoryError, PkiError
from lifecycle.pki import steps, trust
from tests.identities import ROOT

from .conftest import register_ca


def test_factory_cas_are_registered_by_two_officers_and_verify_a_batch(  # type: ignore[no-untyped-def]
        fleet, tmp_path: Path) -> None:
    maker = fleet.makers["acme"]
    pem = maker.factory_ca_pem(1)
    params = {"name": "acme", "certificate_pem": pem}
    with pytest.raises(AccessDenied):
        principals.authorize(fleet.engine, fleet.settings,
                             [fleet.ids.sign(ROOT, "vendor.add-ca", params)], "vendor.add-ca",
                             params, at=utcnow())
    assert "factory CA suite 1" in register_ca(fleet, "acme", pem)
    with pytest.raises(InventoryError, match="registered already"):
        register_ca(fleet, "borealis", pem)
    with pytest.raises(PkiError, match="PEM"):
        register_ca(fleet, "acme", "not a certificate")
    register_ca(fleet, "acme", maker.factory_ca_pem(2))

    files = fleet.batch("acme", tmp_path, 6, suites=(1, 2))
    anchors = steps.factory_cas(fleet.engine, fleet.settings, "acme")
    assert len(anchors) == 2 and steps.factory_cas(fleet.engine, fleet.settings,
                                                   "borealis") == []
    rows = _rows(files.secrets)
    certs = _certificates(files.data)
    for row in rows:
        trust.verify_factory_certificate(row["serial"], row["system_title"], row["suite"],
                                         certs[row["serial"]], anchors, utcnow())
    row = rows[0]
    with pytest.raises(FactoryTrustError, match=row["serial"]):
        trust.verify_factory_certificate(row["serial"], row["system_title"], row["suite"],
                                         certs[row["serial"]],
                                         steps.factory_cas(fleet.engine, fleet.settings,
                                                           "borealis"), utcnow())


def _rows(secrets: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in secrets.read_text(encoding="utf-8").splitlines()]


def _certificates(data: Path) -> dict[str, bytes]:
    """The factory certificates of acme's file (simulator/mappings/acme.toml: a semicolon CSV,
    the certificate as base64 DER in FactoryCert)."""
    with data.open(encoding="utf-8", newline="") as fh:
        return {row["MeterNo"]: base64.b64decode(row["FactoryCert"])
                for row in csv.DictReader(fh, delimiter=";")}


def test_a_factory_ca_row_counts_only_as_the_trail_registered_it(fleet) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from lifecycle.inventory import db

    maker = fleet.makers["acme"]
    for suite in (1, 2):
        register_ca(fleet, "acme", maker.factory_ca_pem(suite))
    assert steps.verify_vendor_cas(fleet.engine, fleet.settings) == []
    with db.transaction(fleet.engine) as session:  # the attacker moves one row, deletes one
        session.execute(text("UPDATE vendor_ca SET vendor_id = (SELECT id FROM vendor WHERE "
                             "name = 'borealis') WHERE subject LIKE '%suite 2%'"))
        session.execute(text("DELETE FROM vendor_ca WHERE subject LIKE '%suite 1%'"))
    assert steps.factory_cas(fleet.engine, fleet.settings, "acme") == []
    assert steps.factory_cas(fleet.engine, fleet.settings, "borealis") == []
    problems = steps.verify_vendor_cas(fleet.engine, fleet.settings)
    assert len(problems) == 3, problems  # moved (2: refused for borealis, gone for acme), deleted
    # The officers signed it for acme: moved to borealis, its registration no longer verifies.
    assert any("of borealis" in p and "parameters differ from what was signed" in p
               for p in problems), problems
    assert sum("no vendor_ca row holds it" in p and "of acme" in p for p in problems) == 2
