"""Bulk writes and reads of the inventory, on both backends: rows that round-trip, errors that
keep nothing, slices read as a list or an array, and statistics that follow a bulk load."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, exc, select, text

from lifecycle.inventory import claims, db, meters
from lifecycle.inventory.meters import KeyVersion, Meter
from tests.conftest import pg_schema

AT = datetime(2026, 11, 30, 5, 40, 1, 123456, tzinfo=UTC)


def _batch(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO vendor (name, signing_key_pem, created_at) "
                          "VALUES ('acme', 'pem', :at)"), {"at": AT})
        conn.execute(text(
            "INSERT INTO import_batch (vendor_id, file_name, file_sha256, manifest_sha256, "
            "batch_ref, record_count, status, imported, quarantined, started_at) "
            "VALUES (1, 'a.csv', 'abc', 'def', 'A-1', 1, 'completed', 0, 0, :at)"), {"at": AT})
        return int(conn.execute(text("SELECT id FROM import_batch")).scalar_one())


def _meters(batch_id: int, count: int, start: int = 0) -> tuple[list[dict], list[list[dict]]]:  # type: ignore[type-arg]
    rows = [{"serial": f"BULK{i:08d}", "system_title": f"{i:016X}", "suite": 0, "vendor_id": 1,
             "batch_id": batch_id, "source_row": i, "state": "registered",
             "factory_certificate": None, "created_at": AT, "updated_at": AT}
            for i in range(start, start + count)]
    keys = [[{"key_id": k, "version": 1, "state": "active", "blob": bytes([k, i % 256]) * 12,
              "mac": None if k else b"\x00mac", "source_digest": f"{i:028x}{k:04x}",
              "kek_label": "kek", "origin": "factory", "created_at": AT,
              "activated_at": AT + timedelta(seconds=k), "expires_at": None}
             for k in range(4)] for i in range(start, start + count)]
    return rows, keys


def _updates(engine) -> list[str]:  # type: ignore[no-untyped-def]
    """The UPDATE statements the engine sends from now on (an executemany is one)."""
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2])
                 if args[2].lstrip().startswith("UPDATE") else None)
    return seen


def _loaded(engine, count: int) -> tuple[list[int], list[list[dict]]]:  # type: ignore[no-untyped-def, type-arg]
    """A batch of ``count`` meters stored with their keys: their ids, and the key rows."""
    rows, keys = _meters(_batch(engine), count)
    with db.transaction(engine) as session:
        return meters.insert_meters(session, rows, keys), keys


def test_bulk_rows_read_back_as_written(engine) -> None:  # type: ignore[no-untyped-def]
    ids, keys = _loaded(engine, 3)
    with db.transaction(engine) as session:
        stored = meters.key_versions(session, ids[2])
        meter = session.get(Meter, ids[2])
    assert meter is not None and meter.serial == "BULK00000002" and meter.factory_certificate \
        is None
    assert [(k.key_id, bytes(k.blob), k.mac and bytes(k.mac), k.source_digest) for k in stored] \
        == [(k["key_id"], k["blob"], k["mac"], k["source_digest"]) for k in keys[2]]
    # Aware datetimes come back as the same instant (UTC), microseconds kept.
    assert [k.activated_at for k in stored] == [k["activated_at"] for k in keys[2]]
    assert stored[0].expires_at is None


def test_a_refused_bulk_row_keeps_none_of_its_transaction(engine) -> None:  # type: ignore[no-untyped-def]
    batch_id = _batch(engine)
    rows, keys = _meters(batch_id, 2)
    with db.transaction(engine) as session:
        meters.insert_meters(session, rows[:1], keys[:1])
    again = [dict(rows[1]), dict(rows[0], source_row=99)]  # a new meter, then a known serial
    with pytest.raises(exc.IntegrityError), db.transaction(engine) as session:
        db.bulk_insert(session.connection(), Meter.__table__, again)
    with db.transaction(engine) as session:
        assert [m.serial for m in meters.list_meters(session)] == ["BULK00000000"]


def test_a_slice_is_read_alike_as_a_list_or_an_array(engine) -> None:  # type: ignore[no-untyped-def]
    ids, keys = _loaded(engine, 5)
    with db.transaction(engine) as session:
        by_id = select(Meter.serial).where(db.among(session, Meter.id, [ids[1], ids[3], -1]))
        by_digest = select(KeyVersion.meter_id).where(db.among(
            session, KeyVersion.source_digest, [keys[4][2]["source_digest"], "absent"]))
        assert sorted(session.execute(by_id).scalars()) == ["BULK00000001", "BULK00000003"]
        assert list(session.execute(by_digest).scalars()) == [ids[4]]
        sql = str(by_id.compile(dialect=engine.dialect))
    # PostgreSQL gets one array parameter, SQLite a list of values.
    assert ("= ANY" in sql) == db.is_postgres(engine)


def test_outcomes_settle_pending_orders_only_the_first_for_an_order(engine) -> None:  # type: ignore[no-untyped-def]
    ids, _ = _loaded(engine, 2)
    with db.transaction(engine) as session:
        claims.add_orders(session, [
            {"order_id": f"CO-{n}", "meter_id": ids[n % 2], "attempt": 1, "kind": "master",
             "key_data": b"kd", "challenge": b"ch", "status": status, "created_at": AT}
            for n, status in enumerate(("pending", "pending", "superseded", "pending"))])
    later = AT + timedelta(minutes=5)
    statements = _updates(engine)
    with db.transaction(engine) as session:
        claims.settle_orders(session, [
            {"order_id": "CO-0", "hes_status": "OK", "verdict": "confirm", "detail": "{}"},
            {"order_id": "CO-1", "hes_status": None, "verdict": "unproven", "detail": "a"},
            {"order_id": "CO-0", "hes_status": "NOT_OK", "verdict": "factory", "detail": "b"},
            {"order_id": "CO-2", "hes_status": "OK", "verdict": "confirm", "detail": "c"},
            {"order_id": "CO-9", "hes_status": "OK", "verdict": "confirm", "detail": "d"}],
            later)
        t = claims.ClaimOrder.__table__.c
        found = {o.order_id: (o.status, o.hes_status, o.verdict, o.detail, o.settled_at and
                              o.settled_at.replace(tzinfo=UTC))
                 for o in session.execute(select(t.order_id, t.status, t.hes_status, t.verdict,
                                                 t.detail, t.settled_at))}
    assert found == {"CO-0": ("answered", "OK", "confirm", "{}", later),
                     "CO-1": ("answered", None, "unproven", "a", later),
                     "CO-2": ("superseded", None, None, None, None),  # not pending: kept
                     "CO-3": ("pending", None, None, None, None)}
    # PostgreSQL gets one statement over arrays for all the outcomes, not one a row.
    assert len(statements) == 1
    assert ("unnest(" in statements[0]) == db.is_postgres(engine)


def test_sqlite_statistics_are_left_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = db.make_engine(f"sqlite:///{tmp_path / 'inventory.db'}")
    db.migrate(engine)
    assert db.refresh_statistics(engine) == []


@pytest.mark.postgres
def test_postgresql_statistics_follow_a_bulk_load() -> None:
    """A new inventory filled in one run: once its statistics are refreshed, the planner knows
    that a chunk's 900 digests match 900 key versions. Without them it took a default share
    of the table (thousands of rows, growing with it), and planned scans of the whole table."""
    with pg_schema() as url:
        engine = db.make_engine(url)
        db.migrate(engine)
        batch_id = _batch(engine)
        for start in range(0, 8000, 2000):
            rows, keys = _meters(batch_id, 2000, start)
            with db.transaction(engine) as session:
                meters.insert_meters(session, rows, keys)
        with engine.connect() as conn:  # PostgreSQL flushes its counters at most once a second
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
        refreshed = db.refresh_statistics(engine)
        assert {"meter", "key_version"} <= set(refreshed)
        assert db.refresh_statistics(engine) == []  # nothing changed since
        digests = [f"{i:028x}{1:04x}" for i in range(0, 8000, 8)][:900]
        with db.transaction(engine) as session:
            stmt = select(KeyVersion.meter_id).where(
                db.among(session, KeyVersion.source_digest, digests))
            compiled = stmt.compile(dialect=engine.dialect)
            plan = [row[0] for row in session.connection().exec_driver_sql(
                f"EXPLAIN {compiled}", compiled.params)]
            assert len(session.execute(stmt).all()) == 900
        estimated = int(re.search(r"rows=(\d+)", plan[0]).group(1))  # type: ignore[union-attr]
        assert 450 <= estimated <= 1800, plan[0]
        engine.dispose()


def test_known_counters_are_updated_in_one_statement(engine) -> None:  # type: ignore[no-untyped-def]
    ids, _ = _loaded(engine, 2)
    with db.transaction(engine) as session:
        versions = [int(v) for v in session.execute(
            select(KeyVersion.id).where(KeyVersion.meter_id.in_(ids)).order_by(KeyVersion.id))
            .scalars()]
        claims.put_counters(session, {versions[0]: 5, versions[1]: 7, versions[2]: 9}, AT)
    later = AT + timedelta(minutes=5)
    statements = _updates(engine)
    with db.transaction(engine) as session:
        # Three known, two new. (The caller checked each is above the last: this call
        # writes what it is given, the equal one included.)
        claims.put_counters(session, {versions[0]: 6, versions[1]: 70, versions[2]: 9,
                                      versions[3]: 1, versions[4]: 2}, later)
        stored = {kv: (ic, at.replace(tzinfo=UTC)) for kv, ic, at in session.execute(select(
            claims.InvocationCounter.key_version_id, claims.InvocationCounter.last_ic,
            claims.InvocationCounter.updated_at))}
    assert stored == {versions[0]: (6, later), versions[1]: (70, later),
                      versions[2]: (9, later), versions[3]: (1, later), versions[4]: (2, later)}
    # One UPDATE for the known counters (executemany): a re-run's recovery over thousands of
    # meters is not thousands of statements. (The new ones go in one bulk insert; PostgreSQL's
    # is a COPY, which SQLAlchemy does not see.)
    assert len([s for s in statements if "invocation_counter" in s]) == 1
