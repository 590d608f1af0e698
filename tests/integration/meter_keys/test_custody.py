"""Key blobs are bound to their meter, key id, version and KEK.

The attacks are written as a writer of the inventory database would make them: plain SQL on the
key_version table, no meterkeys API. Each must be found by the bulk verification and refused
when the blob is opened for use.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import text

from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.errors import IntegrityError
from lifecycle.hsm.connection import Hsm
from lifecycle.inventory import meters
from lifecycle.inventory.db import transaction
from lifecycle.meter_keys import custody

AUDITOR = Actor("test-auditor", "auditor")


def _imported(fleet: Any, tmp_path: Path, count: int = 6) -> list[str]:
    files = fleet.batch("acme", tmp_path / "batch", count, suites=(0, 1, 2))
    state = fleet.run(files, "acme")
    assert state.is_completed(), state.message
    with fleet.engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT serial FROM meter ORDER BY serial"))]


def _verify(fleet: Any) -> set[tuple[str, int, int]]:
    report = custody.verify_all(fleet.settings, fleet.engine, AUDITOR, utcnow())
    return {(b.serial, b.key_id, b.version) for b in report.bad}


def _sql(fleet: Any, statement: str, **params: object) -> None:
    with fleet.engine.begin() as conn:
        conn.execute(text(statement), params)


def _key_row(fleet: Any, serial: str, key_id: int) -> int:
    with fleet.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT kv.id FROM key_version kv JOIN meter m ON m.id = kv.meter_id "
            "WHERE m.serial = :s AND kv.key_id = :k"), {"s": serial, "k": key_id}).scalar_one())


def test_an_import_binds_every_blob(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _imported(fleet, tmp_path)
    report = custody.verify_all(fleet.settings, fleet.engine, AUDITOR, utcnow())
    assert report.checked == 6 * 4 and report.bad == []


def test_swapped_blobs_of_two_meters_are_found(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = _imported(fleet, tmp_path)[:2]
    ra, rb = _key_row(fleet, a, 0), _key_row(fleet, b, 0)
    # The attacker swaps blob and MAC together, so each row still carries a genuine pair.
    _sql(fleet, "UPDATE key_version SET blob = (SELECT blob FROM key_version WHERE id = :rb), "
                "mac = (SELECT mac FROM key_version WHERE id = :rb), "
                "kek_label = (SELECT kek_label FROM key_version WHERE id = :rb) "
                "WHERE id = :ra", ra=ra, rb=rb)
    assert _verify(fleet) == {(a, 0, 1)}


def test_a_blob_moved_to_another_key_id_or_version_is_found(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = _imported(fleet, tmp_path)[0]
    guek, gbek = _key_row(fleet, a, 0), _key_row(fleet, a, 1)
    _sql(fleet, "UPDATE key_version SET blob = (SELECT blob FROM key_version WHERE id = :g), "
                "mac = (SELECT mac FROM key_version WHERE id = :g) WHERE id = :b", g=guek, b=gbek)
    _sql(fleet, "UPDATE key_version SET version = 2 WHERE id = :g", g=_key_row(fleet, a, 2))
    assert _verify(fleet) == {(a, 1, 1), (a, 2, 2)}


def test_a_planted_blob_without_a_valid_mac_is_found(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = _imported(fleet, tmp_path)[:2]
    _sql(fleet, "UPDATE key_version SET mac = NULL WHERE id = :r", r=_key_row(fleet, a, 3))
    _sql(fleet, "UPDATE key_version SET mac = :m WHERE id = :r", m=b"\x00" * 16,
         r=_key_row(fleet, b, 3))
    assert _verify(fleet) == {(a, 3, 1), (b, 3, 1)}


def test_opening_a_swapped_blob_is_refused_and_a_bound_one_opens(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = _imported(fleet, tmp_path)[:2]
    with transaction(fleet.engine) as session:
        good = meters.blob_of(session, a, 0, 1)
        other = meters.blob_of(session, b, 0, 1)
    with Hsm.open(fleet.settings).session() as hs:
        key = custody.open_stored(hs, fleet.settings, good)
        hs.destroy(key)
        swapped = SimpleNamespace(**{**good._asdict(), "blob": other.blob,
                                     "mac": other.mac})
        with pytest.raises(IntegrityError, match=f"meter {a} key 0 version 1 is not bound"):
            custody.open_stored(hs, fleet.settings, swapped)
