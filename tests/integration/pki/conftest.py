"""A fleet with its PKI: the ceremony performed on two security officers' signatures."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.pki import ceremony
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


@pytest.fixture
def pki(fleet) -> Pki:  # type: ignore[no-untyped-def]
    actor = officers_authorize(fleet, "pki.ceremony", {"renew": []})
    report = ceremony.ceremony(fleet.settings, fleet.engine, actor)
    return Pki(fleet, actor, report)
