"""The audit witness: what a checkpoint hands it, when, and how verification reads it back."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from lifecycle import principals
from lifecycle.audit import trail, witness
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import AccessDenied, AuditError
from lifecycle.hsm import provision
from lifecycle.installation import steps
from lifecycle.inventory import hsm_keys, installations
from lifecycle.inventory.audit_events import AuditCheckpoint
from lifecycle.inventory.db import transaction

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
ALICE = Actor("alice", principals.OPERATOR, "run-1")


@pytest.fixture
def mine(engine: Engine, settings: Settings, tmp_path: Path) -> Settings:
    """The session token's settings with a witness of this test's own; the audit key pinned."""
    pin = next(s.pin for s in provision.ensure_keys(settings) if s.role == "audit-signing")
    with transaction(engine) as s:
        hsm_keys.put_pin(s, pin.role, pin.label, pin.key_id, pin.check_value)
    return settings.model_copy(update={"witness_dir": tmp_path / "witness"})


def _fill(engine: Engine, n: int, start: int = 0) -> None:
    with transaction(engine) as s:
        for i in range(start, start + n):
            trail.record(s, ALICE, "meter.read", "ok", detail={"n": i},
                         at=T0 + timedelta(seconds=i))


def _checkpoint(engine: Engine, hsm: Any, settings: Settings) -> AuditCheckpoint | None:
    with transaction(engine) as s, hsm.session() as hs:
        return trail.checkpoint(s, hs, settings, T0 + timedelta(hours=1))


def _lines(settings: Settings) -> list[dict[str, Any]]:
    path = settings.witness_path / witness.FILE_NAME
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


def test_a_checkpoint_goes_to_the_witness_file(engine: Engine, hsm: Any, mine: Settings) -> None:
    _fill(engine, 3)
    made = _checkpoint(engine, hsm, mine)
    assert made is not None
    header, record = _lines(mine)
    with transaction(engine) as s:
        installation = installations.installation_id(s)
    assert header["purpose"] == witness.WITNESS_PURPOSE
    assert header["installation"] == record["installation"] == installation
    assert (record["purpose"], record["seq"], record["head"]) == \
        ("meterkeys-audit-checkpoint/1", 3, made.head_hash)
    assert record["time"] == "2025-03-01T13:00:00.000000+00:00"
    assert len(record["key"]) == 64 and record["signature"]
    assert stat.S_IMODE(mine.witness_path.stat().st_mode) == 0o700
    assert stat.S_IMODE((mine.witness_path / witness.FILE_NAME).stat().st_mode) == 0o600
    assert steps.verify_trail(mine, engine) == 3


def test_a_rolled_back_checkpoint_is_never_witnessed(engine: Engine, hsm: Any,
                                                     mine: Settings) -> None:
    _fill(engine, 2)
    with pytest.raises(RuntimeError), transaction(engine) as s, hsm.session() as hs:
        assert trail.checkpoint(s, hs, mine, T0) is not None
        raise RuntimeError("the caller's transaction fails after the checkpoint")
    assert [line["purpose"] for line in _lines(mine)] == [witness.WITNESS_PURPOSE]
    assert _checkpoint(engine, hsm, mine) is not None  # signed again, witnessed this time
    assert [line.get("seq") for line in _lines(mine)] == [None, 2]
    assert steps.verify_trail(mine, engine) == 2


def test_a_witness_of_another_installation_is_refused(engine: Engine, hsm: Any,
                                                      mine: Settings) -> None:
    witness.FileWitness(mine.witness_path).bind("11111111-2222-4333-8444-555555555555")
    _fill(engine, 2)
    with pytest.raises(AuditError, match="belongs to installation 11111111"):
        _checkpoint(engine, hsm, mine)
    with transaction(engine) as s:  # nothing was signed or stored
        assert s.execute(select(func.count()).select_from(AuditCheckpoint)).scalar_one() == 0


@pytest.fixture
def collector() -> Iterator[socket.socket]:
    """A syslog collector: a UDP socket on 127.0.0.1 that the test reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_syslog_gets_the_same_record_as_the_file(engine: Engine, hsm: Any, mine: Settings,
                                                 collector: socket.socket) -> None:
    port = collector.getsockname()[1]
    both = mine.model_copy(update={"witness_kind": "file+syslog",
                                   "witness_syslog_address": f"127.0.0.1:{port}"})
    _fill(engine, 4)
    assert _checkpoint(engine, hsm, both) is not None
    message = collector.recv(65536).decode("ascii").rstrip("\x00")
    assert message.startswith("<")  # <PRI>, facility auth
    _, line = message.split(witness.SYSLOG_IDENT, 1)
    file_line = (mine.witness_path / witness.FILE_NAME).read_text(encoding="ascii").splitlines()
    assert line == file_line[-1]
    with pytest.raises(AuditError, match="append-only"):
        witness.SyslogWitness(f"127.0.0.1:{port}").records()
    assert steps.verify_trail(both, engine) == 4  # verify reads the file


def test_a_torn_last_line_is_skipped_and_closed(engine: Engine, hsm: Any,
                                                mine: Settings) -> None:
    _fill(engine, 2)
    _checkpoint(engine, hsm, mine)
    path = mine.witness_path / witness.FILE_NAME
    with path.open("a", encoding="ascii") as fh:
        fh.write('{"purpose":"meterkeys-audit-checkpoint/1","seq":')  # a crash mid-append
    assert [r.seq for r in witness.file_of(mine).records().records] == [2]
    _fill(engine, 1, start=2)
    _checkpoint(engine, hsm, mine)
    assert [r.seq for r in witness.file_of(mine).records().records] == [2, 3]
    assert path.read_text(encoding="ascii").splitlines()[2].endswith('"seq":')  # closed
    assert steps.verify_trail(mine, engine) == 3
    with path.open("a", encoding="ascii") as fh:  # JSON, but not a record: named
        fh.write('{"purpose":"meterkeys-audit-checkpoint/1","seq":4}\n')
    with pytest.raises(AuditError, match="line 5: not a checkpoint record"):
        witness.file_of(mine).records()


def test_a_lost_witness_fails_verification(engine: Engine, hsm: Any, mine: Settings) -> None:
    _fill(engine, 2)
    _checkpoint(engine, hsm, mine)
    (mine.witness_path / witness.FILE_NAME).unlink()
    with pytest.raises(AuditError, match="the witness .* holds none"):
        steps.verify_trail(mine, engine)


def test_a_forged_witness_record_is_named(engine: Engine, hsm: Any, mine: Settings) -> None:
    _fill(engine, 3)
    _checkpoint(engine, hsm, mine)
    path = mine.witness_path / witness.FILE_NAME
    header, record = path.read_text(encoding="ascii").splitlines()
    forged = json.loads(record)
    forged["time"] = "2025-03-01T14:00:00.000000+00:00"
    path.write_text(f"{header}\n{json.dumps(forged)}\n", encoding="ascii")
    with pytest.raises(AuditError, match="bad signature") as info:
        steps.verify_trail(mine, engine)
    assert info.value.seq == 3


def test_a_replaced_installation_id_is_named(engine: Engine, hsm: Any, mine: Settings) -> None:
    _fill(engine, 2)
    _checkpoint(engine, hsm, mine)
    with engine.begin() as conn:  # a database writer, plain SQL
        conn.execute(text("UPDATE installation SET id = '11111111-2222-4333-8444-555555555555'"))
    with pytest.raises(AuditError) as info:
        steps.verify_trail(mine, engine)
    assert info.value.seq == 2 and "bad signature" in info.value.reason
    _fill(engine, 1, start=2)
    with pytest.raises(AuditError, match="belongs to installation"):
        _checkpoint(engine, hsm, mine)


def test_verify_needs_the_pinned_audit_key(engine: Engine, settings: Settings,
                                           tmp_path: Path) -> None:
    mine = settings.model_copy(update={"witness_dir": tmp_path / "witness"})
    with pytest.raises(AuditError, match="pins no 'audit-signing' key"):
        steps.verify_trail(mine, engine)


# --- a checkpoint closes every run ---------------------------------------------------------------
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_rerun_of_a_completed_delivery_closes_with_a_checkpoint(fleet: Any,
                                                                  tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 4)
    assert fleet.run(files, "acme").is_completed()
    with pytest.raises(AccessDenied):  # an event after the run: unsigned so far
        fleet.ids.authorize(["test-auditor"], "batch.import", {})
    assert fleet.run(files, "acme").is_completed()  # nothing new to import
    with transaction(fleet.engine) as s:
        head = s.execute(text("SELECT seq FROM audit_head")).scalar_one()
        signed = s.execute(text("SELECT max(seq) FROM audit_checkpoint")).scalar_one()
    assert signed == head
    assert witness.file_of(fleet.settings).records().records[-1].seq == head
    assert os.environ["METERKEYS_WITNESS_DIR"] == str(fleet.settings.witness_path)
    assert steps.verify_trail(fleet.settings, fleet.engine) == head


def test_a_failed_run_closes_with_a_checkpoint(fleet: Any, tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 4)
    files.data.write_bytes(files.data.read_bytes() + b"\n")  # the checksum no longer matches
    state = fleet.run(files, "acme")
    assert state.is_failed()
    with transaction(fleet.engine) as s:
        head = s.execute(text("SELECT seq FROM audit_head")).scalar_one()
        signed = s.execute(text("SELECT max(seq) FROM audit_checkpoint")).scalar_one()
        last = s.execute(text("SELECT action FROM audit_event ORDER BY seq DESC LIMIT 1")
                         ).scalar_one()
    assert last == "batch.reject"
    assert signed == head
    assert witness.file_of(fleet.settings).records().records[-1].seq == head
