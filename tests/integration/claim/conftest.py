"""A small imported fleet, a simulated HES over its meters, and a way to run the claim flow.

The vendor's factory CAs (suites 1 and 2) are registered under two officers' signatures, as
``meterkeys vendor add-ca`` does: the claim verifies suite 1/2 factory certificates first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.inventory import db, meters
from lifecycle.pki import steps as pki_steps
from simulator.hes import SimulatedHes
from tests.identities import ROOT, SECOND


def officers(fleet, action: str, params: dict[str, Any]) -> Actor:  # type: ignore[no-untyped-def]
    """Two security officers sign ``action`` on ``params``; return the accepted actor."""
    signed = [fleet.ids.sign(who, action, params) for who in (ROOT, SECOND)]
    return principals.authorize(fleet.engine, fleet.settings, signed, action, params,
                                at=utcnow())


def register_factory_cas(fleet, vendor: str, suites: Sequence[int] = (1, 2)) -> None:  # type: ignore[no-untyped-def]
    """Register a simulated manufacturer's factory CA certificates (dual control)."""
    for suite in suites:
        pem = fleet.makers[vendor].factory_ca_pem(suite)
        params = {"name": vendor, "certificate_pem": pem}
        signed = [fleet.ids.sign(who, "vendor.add-ca", params) for who in (ROOT, SECOND)]
        actor = principals.authorize(fleet.engine, fleet.settings, signed, "vendor.add-ca",
                                     params, at=utcnow())
        pki_steps.add_vendor_ca(fleet.engine, actor, vendor, pem, utcnow(), requests=signed)


class ClaimFleet:
    """An imported batch of one vendor, its simulated HES, and the claim flow with a request."""

    def __init__(self, fleet: Any, files: Any, hes_dir: Path) -> None:
        self.fleet = fleet
        self.files = files
        self.hes_dir = hes_dir
        self.engine = fleet.engine
        self.settings = fleet.settings

    @property
    def serials(self) -> list[str]:
        with db.transaction(self.engine) as session:
            return [m.serial for m in meters.list_meters(session, limit=10_000)]

    def hes(self) -> SimulatedHes:
        return SimulatedHes.load(self.hes_dir)

    def set_modes(self, modes: Mapping[str, str]) -> None:
        hes = self.hes()
        for serial, mode in modes.items():
            hes.set_mode(serial, mode)

    def params(self, *, serials: Sequence[str] | None = None, batch_id: int | None = None,
               vendor: str | None = None, wait_seconds: float = 0.0,
               workers: int = 0) -> dict[str, Any]:
        return {"batch_id": batch_id, "vendor": vendor,
                "serials": list(serials) if serials else None, "wait_seconds": wait_seconds,
                "workers": workers}

    def run(self, principal: str = "test-operator", **kwargs: Any) -> Any:
        from flows.ownership_claim import ownership_claim

        params = self.params(**kwargs)
        signed = self.fleet.ids.requests([principal], "meter.claim", params)
        return ownership_claim(**params, request=signed, return_state=True)


@pytest.fixture
def claim_fleet(fleet, tmp_path: Path, monkeypatch) -> ClaimFleet:  # type: ignore[no-untyped-def]
    """Nine acme meters (suites 0, 1, 2) imported, and a simulated HES over them."""
    from tasks import context

    files = fleet.batch("acme", tmp_path / "batch", 9, suites=(0, 1, 2))
    state = fleet.run(files, "acme")
    assert state.is_completed(), state.message
    register_factory_cas(fleet, "acme")
    hes_dir = tmp_path / "hes"
    SimulatedHes.open(hes_dir, [files.secrets], engine="cryptography")
    monkeypatch.setenv("METERKEYS_HES", f"simulated:{hes_dir}")
    context.reset()
    return ClaimFleet(fleet, files, hes_dir)
