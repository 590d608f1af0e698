"""Administrative acts are audited with the acting principal: hsm init, key creation, vendor
add, vendor import-key (backup and restore: test_backup.py). Read back with plain SQL."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.errors import InventoryError
from lifecycle.factory_import import vendor as vendor_steps
from lifecycle.hsm import provision
from lifecycle.installation import steps
from lifecycle.inventory.db import Engine, make_engine
from simulator.manufacturer import Manufacturer
from simulator.scenario import MAPPINGS

SPAWN = multiprocessing.get_context("spawn")
OFFICER = Actor("test-officer", "security-officer")


def _init_and_import_key(home: str, db_url: str) -> list[str]:
    """Child side (this home's token): init twice, then the acme import key twice."""
    s, engine = Settings(home=Path(home)), make_engine(db_url)
    first = steps.init(s, engine, make_pin_files=False, actor=OFFICER)
    steps.init(s, engine, make_pin_files=False, actor=OFFICER)
    vendor_steps.issue_import_key(engine, s, OFFICER, "acme", at=utcnow())
    vendor_steps.issue_import_key(engine, s, OFFICER, "acme", at=utcnow())
    return [role for role, _ in first.created_keys]


def _events(engine: Engine) -> list[tuple[str, str, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT action, outcome, detail, principal, role "
                                 "FROM audit_event ORDER BY seq")).all()
    assert {(r[3], r[4]) for r in rows} == {(OFFICER.principal, OFFICER.role)}
    return [(r[0], r[1], json.loads(r[2])) for r in rows]


def test_init_key_creation_and_vendor_acts_are_audited(tmp_path: Path, db_url: str,
                                                       engine: Engine) -> None:
    s = Settings(home=tmp_path / "var")
    provision.generate_pin_files(s)
    maker = Manufacturer.create(tmp_path / "sim" / "acme", "acme", "P-256")
    mapping = (MAPPINGS / "acme.toml").read_text(encoding="utf-8")
    vendor_steps.add_vendor(engine, OFFICER, "acme", maker.signing_public_pem(), mapping,
                            source="acme.toml", at=utcnow())
    with pytest.raises(InventoryError, match="already exists"):
        vendor_steps.add_vendor(engine, OFFICER, "acme", maker.signing_public_pem(), mapping,
                                source="acme.toml", at=utcnow())
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        created = pool.submit(_init_and_import_key, str(s.home_dir), db_url).result(timeout=180)

    events = _events(engine)
    assert [(a, o) for a, o, _ in events if a == "vendor.add"] == [("vendor.add", "ok"),
                                                                     ("vendor.add", "failed")]
    inits = [d for a, _, d in events if a == "hsm.init"]
    assert len(inits) == 2 and inits[1]["created"] == []
    key_events = [d["role"] for a, _, d in events if a == "hsm.key.create"]
    assert sorted(created) == ["audit-signing", "blob-mac", "storage-kek", "storage-kek-master"]
    assert key_events == [*created, "import:acme"]
    imports = [d for a, _, d in events if a == "vendor.import-key"]
    assert [d["created"] for d in imports] == [True, False]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT label FROM hsm_key WHERE role = 'import:acme'")
                            ).scalar_one() == "meterkeys-import-acme"
