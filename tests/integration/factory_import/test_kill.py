"""SIGKILL an import at random moments: the token survives, a re-run imports each row once."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle.hsm.connection import Hsm
from lifecycle.installation import steps
from lifecycle.inventory import batches, db, meters

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

KILLS = 20
METERS = 1000
CHILD = """
from flows.factory_import import factory_import
factory_import(file={file!r}, vendor="acme", workers=1, request={request!r})
"""
PROBE = """
import sys
from lifecycle.config import load_settings
from lifecycle.hsm.connection import Hsm
s = load_settings()
found = Hsm.open(s).has_token_keys(s.storage_kek_label, s.audit_key_label)
sys.exit(0 if all(found.values()) else 3)
"""


def _child_env(fleet) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update({"METERKEYS_DATABASE_URL": fleet.db_url, "METERKEYS_CHUNK_SIZE": "100",
                "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    return env


def _tamper_row(files, maker, row: int) -> None:  # type: ignore[no-untyped-def]
    with files.data.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    gak = rows[row - 1]["GAK"]
    rows[row - 1]["GAK"] = gak[:10] + ("0" if gak[10] != "0" else "1") + gak[11:]
    with files.data.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    maker.resign(files.manifest)


def _kill_at_random_moment(child: subprocess.Popen[bytes], fleet, base: int, target: float,
                           deadline: float) -> int:  # type: ignore[no-untyped-def]
    """Kill the child once ``target`` of its batch is in the inventory on top of ``base``
    meters (0: while it verifies); return how many meters were in when it died."""
    while child.poll() is None and time.monotonic() < deadline:
        with db.transaction(fleet.engine) as session:
            count = meters.count_meters(session)
        if count - base >= target * METERS:
            break
        time.sleep(0.01)
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    with db.transaction(fleet.engine) as session:
        return meters.count_meters(session)


# Runs once, on the embedded default (SQLite file, SoftHSM2 token): a chunk commits through the
# same transaction code on PostgreSQL, whose atomicity the other tests cover.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sigkill_during_import_loses_nothing_and_duplicates_nothing(fleet, tmp_path: Path) -> None:
    env = _child_env(fleet)
    rng = random.Random(20261128)
    killed_midway = 0
    for attempt in range(KILLS):
        # Each attempt imports a fresh batch (own serials) into the same inventory and token.
        files = fleet.batch("acme", tmp_path / str(attempt), METERS, suites=(0, 1),
                            serial_start=1 + attempt * 100_000)
        _tamper_row(files, fleet.makers["acme"], 50)
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(
            file=str(files.data), request=fleet.ids.requests(
                ["test-operator"], "batch.import",
                {"file": str(files.data), "vendor": "acme", "mapping": None, "workers": 1}))],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        before = METERS - 1
        done = _kill_at_random_moment(child, fleet, attempt * before, rng.random(),
                                      time.monotonic() + 60)
        in_batch = done - attempt * before
        killed_midway += 0 < in_batch < before
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, timeout=60, check=False)
        assert probe.returncode == 0, "token did not open, or a long-lived key is gone"
        state = fleet.run(files, "acme")
        assert state.is_completed(), state.message
        summary = state.result()
        assert (summary["imported"], summary["quarantined"]) == (before, 1), attempt
        with db.transaction(fleet.engine) as session:
            assert meters.count_meters(session) == (attempt + 1) * before
            rows = batches.quarantine_list(session, summary["batch_id"])
            assert [(r.row, r.field) for r in rows] == [(50, "gak")]
    # Most kills must have landed in the middle of an import, or this proved little.
    assert killed_midway >= KILLS // 2, killed_midway
    with Hsm.open(fleet.settings).session() as s:
        pem = s.public_key_pem(fleet.settings.audit_key_label).decode()
    assert steps.verify_trail(fleet.settings, fleet.engine, pem) > KILLS * METERS
