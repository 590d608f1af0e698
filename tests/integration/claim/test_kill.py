"""SIGKILL a claim at random moments, then run it again: every meter ends fully claimed (the four
keys at version 2 active, the meter operational and holding them), never on a key the inventory
cannot reproduce, and no key gets a duplicate version."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from lifecycle.inventory import db
from tests.integration.claim.test_claim import CLAIMED, FACTORY, holds_usage_keys, key_states

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

KILLS = 20
PER_KILL = 6
CHILD = """
from flows.ownership_claim import ownership_claim
ownership_claim(serials={serials!r}, wait_seconds=0.0, workers=0, request={request!r})
"""


def _env(cf) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update({"METERKEYS_DATABASE_URL": cf.fleet.db_url, "METERKEYS_CLAIM_CHUNK_SIZE": "2",
                "METERKEYS_HES": f"simulated:{cf.hes_dir}",
                "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    return env


def _claimed_count(cf, serials: list[str]) -> int:  # type: ignore[no-untyped-def]
    with db.transaction(cf.engine) as session:
        return int(session.execute(text(
            "SELECT count(*) FROM meter WHERE state = 'operational'")).scalar_one())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sigkill_during_claim_ends_claimed_or_on_factory_keys(fleet, tmp_path: Path,
                                                             monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lifecycle.pki import ceremony
    from simulator.hes import SimulatedHes
    from tasks import context
    from tests.integration.claim.conftest import ClaimFleet, officers, register_factory_cas

    register_factory_cas(fleet, "acme")
    ceremony.ceremony(fleet.settings, fleet.engine,
                      officers(fleet, "pki.ceremony", {"renew": []}))
    files = fleet.batch("acme", tmp_path / "batch", KILLS * PER_KILL, suites=(0, 1))
    assert fleet.run(files, "acme").is_completed()
    hes_dir = tmp_path / "hes"
    SimulatedHes.open(hes_dir, [files.secrets], engine="cryptography")
    monkeypatch.setenv("METERKEYS_HES", f"simulated:{hes_dir}")
    context.reset()
    cf = ClaimFleet(fleet, files, hes_dir)
    serials = cf.serials
    env = _env(cf)
    rng = random.Random(20261212)
    for attempt in range(KILLS):
        part = serials[attempt * PER_KILL:(attempt + 1) * PER_KILL]
        params = cf.params(serials=part)
        request = fleet.ids.requests(["test-operator"], "meter.claim", params)
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(serials=part,
                                                                     request=request)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        time.sleep(rng.uniform(1.0, 6.0))  # the child spends ~1-2 s starting Prefect
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        hes = cf.hes()
        for serial in part:  # between kill and re-run: claimed, or factory keys reproducible
            states = key_states(cf.engine, serial)
            assert states in (CLAIMED, FACTORY, {(k, 1): "active" for k in range(4)}), states
        state = cf.run(serials=part)
        assert state.is_completed(), state.message
        hes = cf.hes()
        for serial in part:
            assert key_states(cf.engine, serial) == CLAIMED, (attempt, serial)
            assert holds_usage_keys(cf.settings, cf.engine, serial, hes.meters[serial].keys, 2)
            # suite 1: its two certificates on the meter, also when a kill fell between
            # issuing and delivery
            want = {"signature", "key_agreement"} if hes.meters[serial].suite else set()
            assert set(hes.meters[serial].certificates) == want, (attempt, serial)
    with db.transaction(cf.engine) as session:
        dupes = session.execute(text(
            "SELECT meter_id, key_id, count(*) FROM key_version WHERE state IN "
            "('pending', 'active') GROUP BY meter_id, key_id HAVING count(*) > 1")).all()
    assert dupes == []
