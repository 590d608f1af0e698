"""Inventory schema: Alembic creates it and upgrades a populated database, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text

from lifecycle import inventory
from lifecycle.inventory import batches, db, meters

MIGRATIONS = Path(inventory.__file__).parent / "migrations"


def _alembic(engine, revision: str) -> None:  # type: ignore[no-untyped-def]
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def test_upgrade_keeps_rows_and_changes_the_batch_identity(db_url: str) -> None:
    engine = db.make_engine(db_url)
    _alembic(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO vendor (name, signing_key_pem, created_at) "
                          "VALUES ('acme', 'pem', CURRENT_TIMESTAMP)"))
        conn.execute(text(
            "INSERT INTO import_batch (vendor_id, file_name, file_sha256, batch_ref, "
            "record_count, status, imported, quarantined, started_at) "
            "VALUES (1, 'a.csv', 'abc', 'A-1', 3, 'completed', 3, 0, CURRENT_TIMESTAMP)"))
    db.migrate(engine)
    with db.transaction(engine) as session:
        old = batches.find_batch(session, 1, "abc")
        assert old is not None and old.manifest_sha256 == "" and old.imported == 3
        assert batches.find_batch(session, 1, "abc", "other") is None
        session.add(batches.ImportBatch(vendor_id=1, file_name="a.csv", file_sha256="abc",
                                          manifest_sha256="other", batch_ref="A-1",
                                          record_count=3))
    uniques = {u["name"]: u["column_names"]
               for u in inspect(engine).get_unique_constraints("import_batch")}
    assert uniques["uq_import_batch_delivery"] == ["vendor_id", "file_sha256", "manifest_sha256"]
    engine.dispose()


def test_schema_is_created_and_migrate_is_idempotent(engine) -> None:  # type: ignore[no-untyped-def]
    db.migrate(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"vendor", "import_batch", "meter", "key_version", "quarantined_row", "principal",
            "audit_event", "audit_head", "audit_checkpoint", "kek_check"} <= tables
    columns = {c["name"] for c in inspect(engine).get_columns("key_version")}
    assert {"blob", "kek_label", "state", "version", "expires_at"} <= columns
    assert not {"key", "plaintext", "value"} & columns


@pytest.mark.parametrize("bad", ["sqlite:///", "sqlite:///:memory:"])
def test_sqlite_urls_open(bad: str) -> None:
    engine = db.make_engine(bad)
    db.migrate(engine)
    with db.transaction(engine) as session:
        assert meters.count_meters(session) == 0


def test_the_migrations_build_exactly_the_tables_of_the_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    engine = db.make_engine(db_url)
    db.migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []
