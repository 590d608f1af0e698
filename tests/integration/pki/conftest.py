"""A fleet with its PKI: the ceremony performed on two security officers' signatures."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.pki import ceremony
from lifecycle.pki import steps as pki_steps
from tests.identities import ROOT, SECOND


@dataclass
class Pki:
    fleet: object
    actor: Actor
    report: ceremony.CeremonyReport


def officers_authorize(fleet, action: str, params: dict) -> Actor:  # type: ignore[no-untyped-def,type-arg]
    """Two security officers sign ``action`` on ``params``; return the accepted actor."""
    signed = [fleet.ids.sign(who, action, params) for who in (ROOT, SECOND)]
    return principals.authorize(fleet.engine, fleet.settings, signed, action, params,
                                at=utcnow())


def register_ca(fleet, vendor: str, pem: str) -> str:  # type: ignore[no-untyped-def]
    """Two security officers register ``pem`` as a factory CA of ``vendor``; return its
    subject (as ``meterkeys vendor add-ca`` and ``approve`` do)."""
    params = {"name": vendor, "certificate_pem": pem}
    signed = [fleet.ids.sign(who, "vendor.add-ca", params) for who in (ROOT, SECOND)]
    actor = principals.authorize(fleet.engine, fleet.settings, signed, "vendor.add-ca", params,
                                 at=utcnow())
    return pki_steps.add_vendor_ca(fleet.engine, actor, vendor, pem, utcnow(), requests=signed)


@pytest.fixture
def pki(fleet) -> Pki:  # type: ignore[no-untyped-def]
    actor = officers_authorize(fleet, "pki.ceremony", {"renew": []})
    report = ceremony.ceremony(fleet.settings, fleet.engine, actor)
    return Pki(fleet, actor, report)
