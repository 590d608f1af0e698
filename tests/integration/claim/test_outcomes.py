"""Outcomes that must change nothing: unknown, replayed, an old counter; and attacks by plain
SQL: an order marked confirmed, a pending blob swapped."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import text

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.claim import steps
from lifecycle.clock import utcnow
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.inventory import audit_events, claims, db, meters
from lifecycle.policy import KeyId
from tests.integration.claim.test_claim import CLAIMED, FACTORY, key_states

pytestmark = pytest.mark.usefixtures("prefect_server")
ACTOR = Actor("test-operator", "operator")


def _prepare(cf, serials):  # type: ignore[no-untyped-def]
    ids = steps.select_meters(cf.engine, steps.Selection(serials=tuple(serials)))
    workers = HsmWorkers(cf.settings, 0)
    orders, report = steps.prepare_chunk(workers, cf.engine, cf.settings, ACTOR, ids, utcnow())
    assert not report.failed
    return workers, orders


def _events(cf, action: str):  # type: ignore[no-untyped-def]
    with db.snapshot(cf.engine) as session:
        return trail.events(session, limit=1000, action=action)


def test_unknown_and_replayed_outcomes_change_nothing_and_are_audited(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    cf = claim_fleet
    serial = cf.serials[0]
    workers, orders = _prepare(cf, [serial])
    hes = cf.hes()
    hes.submit(orders)
    outcomes = hes.outcomes()
    first = steps.settle(workers, cf.engine, cf.settings, ACTOR, outcomes, utcnow())
    assert first.claimed == [serial]
    assert key_states(cf.engine, serial) == CLAIMED
    before = len(_events(cf, "claim.outcome"))
    unknown = replace(outcomes[0], order_id="CO-0000000000000000")
    again = steps.settle(workers, cf.engine, cf.settings, ACTOR, [*outcomes, unknown], utcnow())
    assert again.claimed == [] and again.failed == {}
    assert key_states(cf.engine, serial) == CLAIMED
    latest = _events(cf, "claim.outcome")[: len(outcomes) + 1]
    assert len(_events(cf, "claim.outcome")) == before + len(outcomes) + 1
    assert {e.outcome for e in latest} == {"ignored"}


def test_a_counter_at_or_below_the_last_is_refused(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    cf = claim_fleet
    serial = cf.serials[1]
    workers, orders = _prepare(cf, [serial])
    hes = cf.hes()
    hes.submit(orders)
    outcomes = hes.outcomes()
    with db.transaction(cf.engine) as session:
        meter = meters.get_meter(session, serial)
        guek = next(k for k in meters.key_versions(session, int(meter.id or 0))
                    if k.key_id == KeyId.GUEK and k.state == "pending")
        claims.put_counter(session, int(guek.id or 0), 1, utcnow())  # the proof's own counter
    report = steps.settle(workers, cf.engine, cf.settings, ACTOR, outcomes, utcnow())
    assert report.claimed == []
    assert key_states(cf.engine, serial) == FACTORY
    assert any(e.outcome == "replayed" and e.meter_serial == serial
               for e in _events(cf, "claim.outcome"))


def test_an_order_confirmed_by_sql_changes_no_key(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    cf = claim_fleet
    serial = cf.serials[2]
    cf.set_modes({serial: "silent"})
    assert cf.run(serials=[serial]).is_completed()
    with db.transaction(cf.engine) as session:
        session.execute(text("UPDATE claim_order SET status = 'confirmed'"))
        session.execute(text("UPDATE claim_order SET verdict = 'confirm'"))
    assert key_states(cf.engine, serial) == FACTORY
    # The meter stays in claim: the next run re-sends the same pending keys and proves them.
    cf.set_modes({serial: "ok"})
    state = cf.run(serials=[serial])
    assert state.is_completed(), state.message
    assert state.result()["claimed"] == [serial]
    assert key_states(cf.engine, serial) == CLAIMED


def test_a_swapped_pending_blob_is_caught_by_its_mac(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    cf = claim_fleet
    one, two = cf.serials[3], cf.serials[6]  # both suite 0: blobs of one length
    workers, orders = _prepare(cf, [one, two])
    with db.transaction(cf.engine) as session:
        ids = [int(meters.get_meter(session, s).id or 0) for s in (one, two)]
    with db.transaction(cf.engine) as session:
        # The attacker swaps the two meters' pending GUEK blobs (and MACs stay put).
        rows = session.execute(text(
            "SELECT id, blob FROM key_version WHERE key_id = 0 AND state = 'pending' "
            "AND meter_id IN (:a, :b) ORDER BY meter_id"), {"a": ids[0], "b": ids[1]}).all()
        for (row_id, _), (_, blob) in zip(rows, reversed(rows), strict=True):
            session.execute(text("UPDATE key_version SET blob = :b WHERE id = :i"),
                            {"b": blob, "i": row_id})
    hes = cf.hes()
    hes.submit(orders)
    report = steps.settle(workers, cf.engine, cf.settings, ACTOR, hes.outcomes(), utcnow())
    assert report.claimed == []
    recovered = steps.recover(workers, hes, cf.engine, cf.settings, ACTOR, ids, utcnow())
    assert recovered.recovered == []
    for serial in (one, two):
        assert key_states(cf.engine, serial) == FACTORY
    reasons = [e.detail for e in _events(cf, "claim.outcome") if e.meter_serial == one]
    assert any("not bound" in d for d in reasons)


def test_orders_exported_for_a_file_hes_and_confirmed_back(claim_fleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lifecycle.hes.files import FileHes
    from lifecycle.hes.port import decode_orders, encode_lines, outcome_line

    cf = claim_fleet
    serial = cf.serials[4]
    workers, _orders = _prepare(cf, [serial])
    out = tmp_path / "orders.jsonl"
    FileHes.export(steps.export_orders(cf.engine, ACTOR, utcnow()), out)
    text_out = out.read_text(encoding="utf-8")
    exported = decode_orders(text_out, str(out))
    assert {o.meter_serial for o in exported} == {serial}
    hes = cf.hes()  # plays the real HES: runs the file's orders on the meter
    hes.submit(exported)
    answers = tmp_path / "outcomes.jsonl"
    answers.write_text(encode_lines(outcome_line(o) for o in hes.outcomes()), encoding="utf-8")
    report = steps.settle(workers, cf.engine, cf.settings, ACTOR, FileHes.confirm(answers),
                          utcnow())
    assert report.claimed == [serial], report
    assert key_states(cf.engine, serial) == CLAIMED


def test_recovering_settled_meters_waits_for_no_writer_and_records_nothing(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    """The recovery of a chunk whose meters all proved their claim has nothing to settle: it
    must not queue behind another chunk's commit (the workers would wait for both), nor write
    to the trail."""
    import threading

    cf = claim_fleet
    serial = cf.serials[3]
    workers, orders = _prepare(cf, [serial])
    hes = cf.hes()
    hes.submit(orders)
    assert steps.settle(workers, cf.engine, cf.settings, ACTOR, hes.outcomes(),
                        utcnow()).claimed == [serial]
    with db.snapshot(cf.engine) as session:
        ids = [int(m.id or 0) for m in meters.list_meters(session, limit=100)
               if m.serial == serial]
        head = audit_events.read_head(session)
    done: list[steps.Report] = []
    with steps._WRITE_LOCK:  # another chunk's commit under way
        runner = threading.Thread(target=lambda: done.append(steps.recover(
            workers, hes, cf.engine, cf.settings, ACTOR, ids, utcnow())))
        runner.start()
        runner.join(timeout=30)
        assert done, "the recovery waited for the other chunk's commit"
    assert done[0].summary() == steps.Report().summary()
    with db.snapshot(cf.engine) as session:
        assert audit_events.read_head(session) == head
