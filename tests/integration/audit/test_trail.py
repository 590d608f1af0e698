"""The audit trail on a real database (SQLite and PostgreSQL) and the real SoftHSM2 audit key."""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, update
from sqlmodel import col

from lifecycle import principals
from lifecycle.audit import chain, trail, witness
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.errors import AccessDenied, AuditError, InventoryError
from lifecycle.inventory import db
from lifecycle.inventory.audit_events import AuditCheckpoint, AuditEvent, AuditHead
from lifecycle.inventory.db import transaction
from tests.identities import Identities

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
ALICE = Actor("alice", principals.OPERATOR, "flow-run-1")


def _fill(engine: Engine, n: int, start: int = 0) -> None:
    with transaction(engine) as s:
        for i in range(start, start + n):
            trail.record(s, ALICE, "meter.read", "ok", meter_serial=f"M{i:05d}", batch_id=i % 3,
                         detail={"n": i, "note": "ünïcode"}, at=T0 + timedelta(seconds=i))


class Audit:
    """One test's trail: its inventory, the session token's audit key, a witness of its own."""

    def __init__(self, engine: Engine, hsm: Any, settings: Settings) -> None:
        self.engine, self.hsm, self.settings = engine, hsm, settings
        with hsm.session() as hs:
            self.pem = hs.public_key_pem(settings.audit_key_label).decode("ascii")

    def checkpoint(self, every: int | None = None) -> AuditCheckpoint | None:
        settings = self.settings if every is None else \
            self.settings.model_copy(update={"audit_checkpoint_every": every})
        with transaction(self.engine) as s, self.hsm.session() as hs:
            if every is None:
                return trail.checkpoint(s, hs, settings, T0)
            return trail.maybe_checkpoint(s, hs, settings, T0)

    def verify(self, pem: str | None = None) -> int:
        pem = pem or self.pem
        held = witness.file_of(self.settings).records()
        with db.snapshot(self.engine) as s:
            return trail.verify(s, pem, chain.key_fingerprint(self.pem), held)

    def broken(self, pem: str | None = None) -> AuditError:
        with pytest.raises(AuditError) as info:
            self.verify(pem)
        return info.value


@pytest.fixture
def audit(engine: Engine, hsm: Any, settings: Settings, tmp_path: Path) -> Audit:
    return Audit(engine, hsm, settings.model_copy(update={"witness_dir": tmp_path / "witness"}))


def _sql(engine: Engine, stmt: Any) -> None:
    with engine.begin() as conn:
        conn.execute(stmt)


# --- intact --------------------------------------------------------------------------------------
def test_empty_trail_verifies(engine: Engine, audit: Audit) -> None:
    assert audit.verify() == 0


def test_intact_chain_with_checkpoints_verifies(engine: Engine, audit: Audit) -> None:
    _fill(engine, 5)
    first = audit.checkpoint()
    _fill(engine, 4, start=5)
    second = audit.checkpoint()
    assert first is not None and first.seq == 5
    assert second is not None and second.seq == 9
    assert audit.checkpoint() is None  # head already signed
    assert audit.verify() == 9
    with transaction(engine) as s:
        rows = s.execute(select(AuditEvent).order_by(col(AuditEvent.seq))).scalars().all()
    assert [r.seq for r in rows] == list(range(1, 10))
    assert rows[0].prev_hash == chain.GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:], strict=False))


def test_record_many_appends_in_one_chain(engine: Engine, audit: Audit) -> None:
    _fill(engine, 2)
    batch = [{"action": "batch.import", "outcome": "ok", "meter_serial": f"S{i}",
              "batch_id": 7, "detail": {"row": i}} for i in range(5000)]
    with transaction(engine) as s:
        assert trail.record_many(s, ALICE, batch, T0) == 5000
    _fill(engine, 1, start=2)
    assert audit.verify() == 5003


def test_maybe_checkpoint_waits_for_every(engine: Engine, audit: Audit) -> None:
    _fill(engine, 3)
    assert audit.checkpoint(every=4) is None
    _fill(engine, 1, start=3)
    made = audit.checkpoint(every=4)
    assert made is not None and made.seq == 4
    assert audit.checkpoint(every=4) is None


# --- tampering -----------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [
    pytest.param({"detail": '{"n":3,"note":"edited"}'}, id="detail"),
    pytest.param({"outcome": "denied"}, id="outcome"),
    pytest.param({"principal": "mallory"}, id="principal"),
    pytest.param({"at": T0 + timedelta(days=1)}, id="time"),
])
def test_altered_event_is_named(engine: Engine, audit: Audit, values: dict[str, Any]) -> None:
    _fill(engine, 6)
    _sql(engine, update(AuditEvent).where(col(AuditEvent.seq) == 4).values(**values))
    err = audit.broken()
    assert err.seq == 4
    assert "altered" in err.reason


def test_deleted_middle_event_is_named(engine: Engine, audit: Audit) -> None:
    _fill(engine, 6)
    _sql(engine, delete(AuditEvent).where(col(AuditEvent.seq) == 3))
    err = audit.broken()
    assert err.seq == 3
    assert "missing" in err.reason


def test_deleted_first_event_is_named(engine: Engine, audit: Audit) -> None:
    _fill(engine, 3)
    _sql(engine, delete(AuditEvent).where(col(AuditEvent.seq) == 1))
    assert audit.broken().seq == 1


def test_renumbered_gap_breaks_the_link(engine: Engine, audit: Audit) -> None:
    _fill(engine, 5)
    _sql(engine, delete(AuditEvent).where(col(AuditEvent.seq) == 3))
    _sql(engine, update(AuditEvent).where(col(AuditEvent.seq) > 3).values(
        seq=AuditEvent.seq - 1))  # type: ignore[operator]
    err = audit.broken()
    assert err.seq == 3
    assert "prev_hash" in err.reason


def test_truncation_against_the_head_is_named(engine: Engine, audit: Audit) -> None:
    _fill(engine, 7)
    _sql(engine, delete(AuditEvent).where(col(AuditEvent.seq) >= 6))
    err = audit.broken()
    assert err.seq == 6
    assert "truncated" in err.reason


def test_truncation_with_rewound_head_is_caught_by_checkpoint(
        engine: Engine, audit: Audit) -> None:
    _fill(engine, 7)
    audit.checkpoint()  # signs seq 7
    with transaction(engine) as s:
        last = s.execute(select(AuditEvent.hash).where(col(AuditEvent.seq) == 5)).scalar_one()
    _sql(engine, delete(AuditEvent).where(col(AuditEvent.seq) >= 6))
    _sql(engine, update(AuditHead).values(seq=5, hash=last))  # a careful attacker
    err = audit.broken()
    assert err.seq == 6
    assert "checkpoint" in err.reason and "truncated" in err.reason


def test_rehashed_tail_is_caught_by_checkpoint(engine: Engine, audit: Audit) -> None:
    """An attacker who alters event 2 and recomputes every later hash still fails the checkpoint."""
    _fill(engine, 4)
    audit.checkpoint()
    with transaction(engine) as s:
        rows = [dict(r._mapping) for r in s.execute(
            select(AuditEvent.__table__).order_by(col(AuditEvent.seq)))]  # type: ignore[attr-defined]
    rows[1]["outcome"] = "failed"
    prev = rows[0]["hash"]
    for row in rows[1:]:
        row["prev_hash"], row["hash"] = prev, chain.event_hash(prev, row)
        prev = row["hash"]
        _sql(engine, update(AuditEvent).where(col(AuditEvent.seq) == row["seq"]).values(
            outcome=row["outcome"], prev_hash=row["prev_hash"], hash=row["hash"]))
    _sql(engine, update(AuditHead).values(hash=prev))
    err = audit.broken()
    assert err.seq == 4
    assert "differs" in err.reason


def test_altered_checkpoint_signature_is_named(engine: Engine, audit: Audit) -> None:
    _fill(engine, 3)
    made = audit.checkpoint()
    assert made is not None
    _fill(engine, 2, start=3)
    sig = bytearray(made.signature)
    sig[-1] ^= 0x01
    _sql(engine, update(AuditCheckpoint).where(col(AuditCheckpoint.id) == made.id).values(
        signature=bytes(sig)))
    err = audit.broken()
    assert err.seq == 3
    assert "bad signature" in err.reason


def test_checkpoint_of_another_key_is_refused(engine: Engine, audit: Audit) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _fill(engine, 2)
    audit.checkpoint()
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    err = audit.broken(other)
    assert err.seq is None and "not the key pinned" in err.reason


@pytest.mark.parametrize(("values", "seq", "words"), [
    pytest.param({"hash": "f" * 64}, 5, "head hash", id="head-hash"),
    pytest.param({"seq": 4}, 5, "beyond the head", id="head-seq-back"),
    pytest.param({"seq": 9}, 6, "truncated", id="head-seq-ahead"),
])
def test_altered_head_is_named(engine: Engine, audit: Audit, values: dict[str, Any], seq: int,
                               words: str) -> None:
    _fill(engine, 5)
    _sql(engine, update(AuditHead).values(**values))
    err = audit.broken()
    assert err.seq == seq
    assert words in err.reason


def test_missing_head_is_named_and_not_restarted(engine: Engine, audit: Audit) -> None:
    _fill(engine, 3)
    _sql(engine, delete(AuditHead))
    assert audit.broken().seq == 3
    with pytest.raises(AuditError, match="head is missing"), transaction(engine) as s:
        trail.record(s, ALICE, "meter.read", "ok", at=T0)


def test_checkpoint_refuses_to_sign_a_forged_head(engine: Engine, audit: Audit) -> None:
    _fill(engine, 3)
    _sql(engine, update(AuditHead).values(hash="a" * 64))
    with pytest.raises(AuditError) as info:
        audit.checkpoint()
    assert info.value.seq == 3


def test_first_bad_event_wins(engine: Engine, audit: Audit) -> None:
    _fill(engine, 8)
    _sql(engine, update(AuditEvent).where(col(AuditEvent.seq) == 6).values(outcome="x"))
    _sql(engine, update(AuditEvent).where(col(AuditEvent.seq) == 2).values(outcome="x"))
    assert audit.broken().seq == 2


# --- key material --------------------------------------------------------------------------------
class _Label(str):
    """A string subclass: not a plain value, so the detail gets the full walk."""


@pytest.mark.parametrize("detail", [
    pytest.param({"note": b"\x00" * 16}, id="bytes"),
    pytest.param({"note": "00112233445566778899aabbccddeeff"}, id="hex-32"),
    pytest.param({"note": "key is 00112233445566778899AABBCCDDEEFF!"}, id="hex-inside"),
    pytest.param({"key": "x"}, id="name-key"),
    pytest.param({"so_pin": "x"}, id="name-pin"),
    pytest.param({"wrappedKey": "x"}, id="name-camel"),
    pytest.param({"blob": 1}, id="name-blob"),
    pytest.param({"client_secret": "x"}, id="name-secret"),
    pytest.param({"meters": [{"serial": "M1", "wrapped": "x"}]}, id="nested"),
    # Containers other than plain dicts and lists take the full walk: still refused.
    pytest.param({"meters": [OrderedDict(serial="M1", wrapped="x")]}, id="nested-ordered"),
    pytest.param(OrderedDict(note="x", kek="y"), id="ordered-top"),
    pytest.param({"meters": [MappingProxyType({"blob": 1})]}, id="nested-proxy"),
    pytest.param({"labels": _Label("00112233445566778899aabbccddeeff")}, id="str-subclass"),
])
def test_key_material_is_refused(engine: Engine, detail: dict[str, Any]) -> None:
    with pytest.raises(AuditError) as info, transaction(engine) as s:
        trail.record(s, ALICE, "meter.read", "ok", detail=detail, at=T0)
    assert "00112233" not in str(info.value)  # the value is never echoed
    with transaction(engine) as s:
        assert s.execute(select(func.count()).select_from(AuditEvent)).scalar_one() == 0


@pytest.mark.parametrize("detail", [
    pytest.param({"key_id": 2, "kek_label": "meterkeys-storage-kek"}, id="references"),
    pytest.param({"mapping": "vendor-a", "shipping": "x"}, id="pin-inside-word"),
    pytest.param({"flow": "3f2b1c4d-0a1b-4c2d-8e9f-001122334455"}, id="dashed-uuid"),
])
def test_reference_details_are_kept(engine: Engine, audit: Audit, detail: dict[str, Any]) -> None:
    with transaction(engine) as s:
        trail.record(s, ALICE, "meter.read", "ok", detail=detail, at=T0)
    assert audit.verify() == 1


def test_record_many_refuses_the_whole_batch(engine: Engine) -> None:
    batch = [{"action": "batch.import", "outcome": "ok", "detail": {"row": 1}},
             {"action": "batch.import", "outcome": "ok", "detail": {"wrapped_key": "x"}}]
    with pytest.raises(AuditError, match="event 1 of batch"), transaction(engine) as s:
        trail.record_many(s, ALICE, batch, T0)
    with transaction(engine) as s:
        assert s.execute(select(func.count()).select_from(AuditEvent)).scalar_one() == 0


# --- roles ---------------------------------------------------------------------------------------
def test_denied_action_leaves_an_audit_event(engine: Engine, audit: Audit,
                                             tmp_path: Path) -> None:
    ids = Identities(audit.settings, engine, tmp_path / "keys")
    ids.bootstrap()
    with pytest.raises(AccessDenied) as info:
        principals.authorize(engine, ids.settings, [ids.sign("test-operator", "hsm.init", {})],
                             "hsm.init", {}, at=utcnow(), flow_run_id="run-9")
    assert (info.value.principal, info.value.role) == ("test-operator", principals.OPERATOR)
    actor = ids.authorize(["test-operator"], "batch.import", {})
    assert actor == Actor("test-operator", principals.OPERATOR, None)
    with transaction(engine) as s:
        seen = [(e.principal, e.action, e.outcome, e.flow_run_id)
                for e in reversed(trail.events(s))]
    assert seen[0] == ("test-so", "principal.bootstrap", "ok", None)
    assert seen[-2:] == [("test-operator", "hsm.init", "denied", "run-9"),
                         ("test-operator", "request.accepted", "ok", None)]
    assert audit.verify() == len(seen)


def test_enrol_needs_two_security_officers(engine: Engine, audit: Audit,
                                           tmp_path: Path) -> None:
    ids = Identities(audit.settings, engine, tmp_path / "keys")
    ids.bootstrap()
    with pytest.raises(AccessDenied, match="role not permitted"):
        ids.enrol("eve", principals.SECURITY_OFFICER, by=["test-auditor", "test-so"])
    pem = ids.keygen("another").public_key_pem()
    params = principals.enrolment_params("test-auditor", principals.OPERATOR, pem)
    with pytest.raises(InventoryError, match="already exists"):
        principals.enrol(engine, ids.settings,
                         [ids.sign(w, principals.ENROL, params) for w in ("test-so", "test-so-2")],
                         "test-auditor", principals.OPERATOR, pem, at=utcnow())
    with transaction(engine) as s:
        assert principals.role_of(s, "eve") is None
        assert principals.role_of(s, "test-auditor") == principals.AUDITOR
        assert [p.name for p in principals.list_principals(s)] == [
            "test-auditor", "test-operator", "test-so", "test-so-2"]
        denied = trail.events(s, action="principal.enrol")
    assert [(e.principal, e.outcome) for e in denied if e.outcome == "denied"] == [
        ("test-auditor", "denied")]


# --- concurrency ---------------------------------------------------------------------------------
def test_concurrent_appenders_stay_linear(engine: Engine, audit: Audit) -> None:
    per_thread, errors = 25, []
    barrier = threading.Barrier(2)

    def work(name: str) -> None:
        try:
            barrier.wait(timeout=30)
            for i in range(per_thread):
                with transaction(engine) as s:
                    trail.record(s, Actor(name, principals.OPERATOR), "meter.read", "ok",
                                 detail={"i": i}, at=T0 + timedelta(milliseconds=i))
                    if i % 5 == 0:  # some bulk appends too, interleaved with single ones
                        trail.record_many(s, Actor(name, principals.OPERATOR),
                                          [{"action": "batch.import", "outcome": "ok"}] * 3, T0)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    expected = 2 * (per_thread + 3 * 5)
    assert audit.verify() == expected
    with transaction(engine) as s:
        seqs = s.execute(select(AuditEvent.seq).order_by(col(AuditEvent.seq))).scalars().all()
        by = s.execute(select(AuditEvent.principal, func.count()).group_by(
            col(AuditEvent.principal))).all()
    assert list(seqs) == list(range(1, expected + 1))
    assert dict(by) == {"t1": expected // 2, "t2": expected // 2}
