"""SIGKILL a claim at random moments, then run it again: every meter ends fully claimed (the four
keys at version 2 active, the meter operational and holding them), never on a key the inventory
cannot reproduce, and no key gets a duplicate version.

The kill points are drawn across the claim's progress, which the test watches in the inventory
(pending key versions made, orders answered, meters operational, certificate orders written):
each attempt waits for a random count of one of them, then kills. Where each kill fell is
counted, and most must fall inside the claim, not before it started or after it ended."""

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
# What the test watches to pick a kill point: a count over the attempt's meters, and its most.
PROGRESS = {
    "pending versions": ("SELECT count(*) FROM key_version k JOIN meter m ON m.id = k.meter_id "
                         "WHERE k.state = 'pending' AND m.serial IN ({})", 4 * PER_KILL),
    "orders answered": ("SELECT count(*) FROM claim_order o JOIN meter m ON m.id = o.meter_id "
                        "WHERE o.status != 'pending' AND m.serial IN ({})", 2 * PER_KILL),
    "meters operational": ("SELECT count(*) FROM meter m WHERE m.state = 'operational' "
                           "AND m.serial IN ({})", PER_KILL),
    "certificate orders": ("SELECT count(*) FROM certificate_order c JOIN meter m "
                           "ON m.id = c.meter_id WHERE m.serial IN ({})", PER_KILL // 2),
}
CHILD = """
from flows.ownership_claim import ownership_claim
ownership_claim(serials={serials!r}, wait_seconds=0.0, workers=0, request={request!r})
"""


def _env(cf) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update({"METERKEYS_DATABASE_URL": cf.fleet.db_url, "METERKEYS_CLAIM_CHUNK_SIZE": "2",
                "METERKEYS_CERTIFY_CHUNK_SIZE": "2",
                "METERKEYS_HES": f"simulated:{cf.hes_dir}",
                "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    return env


def _count(cf, query: str, serials: list[str]) -> int:  # type: ignore[no-untyped-def]
    names = ", ".join(f":s{i}" for i in range(len(serials)))
    with db.transaction(cf.engine) as session:
        return int(session.execute(text(query.format(names)),
                                   {f"s{i}": s for i, s in enumerate(serials)}).scalar_one())


def _kill_at(cf, child: subprocess.Popen, serials: list[str], watch: str,  # type: ignore[no-untyped-def, type-arg]
             target: int) -> bool:
    """Kill the child once ``watch`` reaches ``target``; False if it ended before."""
    query = PROGRESS[watch][0]
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        if _count(cf, query, serials) >= target:
            break
        time.sleep(0.005)
    if child.poll() is not None:
        return False
    os.killpg(child.pid, signal.SIGKILL)
    return True


def _where(states: list[dict[tuple[int, int], str]], operational: int, certified: int) -> str:
    """Name the point of the claim a kill left the attempt's meters at."""
    if all(s == {(k, 1): "active" for k in range(4)} for s in states):
        return "before any key was made"
    if all(s == CLAIMED for s in states) and certified == PER_KILL // 2:
        return "after the claim"
    if operational:
        return "meters claimed, certificates not all delivered" if all(
            s == CLAIMED for s in states) else "some meters claimed, others not"
    return "keys pending, no meter claimed"


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
    landed: dict[str, int] = {}
    for attempt in range(KILLS):
        part = serials[attempt * PER_KILL:(attempt + 1) * PER_KILL]
        params = cf.params(serials=part)
        request = fleet.ids.requests(["test-operator"], "meter.claim", params)
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(serials=part,
                                                                     request=request)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        watch = list(PROGRESS)[attempt % len(PROGRESS)]
        killed = _kill_at(cf, child, part, watch, rng.randint(1, PROGRESS[watch][1]))
        child.wait(timeout=30)
        states = [key_states(cf.engine, serial) for serial in part]
        for found in states:  # between kill and re-run: claimed, or factory keys reproducible
            assert found in (CLAIMED, FACTORY, {(k, 1): "active" for k in range(4)}), found
        where = _where(states, _count(cf, PROGRESS["meters operational"][0], part),
                       _count(cf, PROGRESS["certificate orders"][0], part)) if killed \
            else "the run ended first"
        landed[where] = landed.get(where, 0) + 1
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
    print("kill points:", landed)
    inside = KILLS - landed.get("the run ended first", 0) - landed.get(
        "before any key was made", 0) - landed.get("after the claim", 0)
    assert inside >= KILLS // 2, landed
    with db.transaction(cf.engine) as session:
        dupes = session.execute(text(
            "SELECT meter_id, key_id, count(*) FROM key_version WHERE state IN "
            "('pending', 'active') GROUP BY meter_id, key_id HAVING count(*) > 1")).all()
    assert dupes == []
