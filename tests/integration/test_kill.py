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

from lifecycle import audit, inventory
from lifecycle.hsm import Hsm

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

KILLS = 20
METERS = 2000
CHILD = """
from flows.factory_import import factory_import
factory_import(file={file!r}, vendor="acme", principal="test-operator", workers=1)
"""
PROBE = """
import sys
from lifecycle.config import load_settings
from lifecycle.hsm import Hsm
s = load_settings()
found = Hsm.open(s).has_token_keys(s.storage_kek_label, s.audit_key_label)
sys.exit(0 if all(found.values()) else 3)
"""


def _child_env(fleet) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update({"METERKEYS_DATABASE_URL": fleet.db_url, "METERKEYS_CHUNK_SIZE": "100",
                "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
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


def test_sigkill_during_import_loses_nothing_and_duplicates_nothing(fleet, tmp_path: Path) -> None:
    if not fleet.db_url.startswith("sqlite"):
        pytest.skip("kill test runs once, on the embedded default (SQLite); PostgreSQL "
                    "atomicity of a chunk is the same transaction code")
    files = fleet.batch("acme", tmp_path, METERS, suites=(0, 1))
    _tamper_row(files, fleet.makers["acme"], 50)
    env = _child_env(fleet)
    rng = random.Random(20261128)
    progress = []
    for _ in range(KILLS):
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(file=str(files.data))],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        time.sleep(rng.uniform(1.5, 5.0))
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, timeout=60, check=False)
        assert probe.returncode == 0, "token did not open, or a long-lived key is gone"
        with inventory.transaction(fleet.engine) as session:
            progress.append(inventory.count_meters(session))
    # At least one kill must have landed in the middle of an import, or this proved nothing.
    assert any(0 < n < METERS - 1 for n in progress), progress
    state = fleet.run(files, "acme")
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["imported"], summary["quarantined"]) == (METERS - 1, 1)
    with inventory.transaction(fleet.engine) as session:
        assert inventory.count_meters(session) == METERS - 1
        rows = inventory.quarantine_list(session, summary["batch_id"])
        assert [(r.row, r.field) for r in rows] == [(50, "gak")]
    with Hsm.open(fleet.settings).session() as s:
        pem = s.public_key_pem(fleet.settings.audit_key_label).decode()
    with audit.snapshot(fleet.engine) as session:
        assert audit.verify(session, pem) > METERS
