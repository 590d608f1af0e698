"""The inventory's engine, transactions, migrations and bulk insert.

SQLite by default (WAL, foreign keys on, writers queue at BEGIN IMMEDIATE), PostgreSQL by URL.
The schema is created and upgraded by Alembic (``migrate``), never by ``create_all``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    ARRAY,
    Boolean,
    Connection,
    DateTime,
    Engine,
    String,
    TypeDecorator,
    any_,
    create_engine,
    event,
    insert,
    literal,
    text,
)
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from lifecycle.errors import InventoryError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
T = TypeVar("T")

# Alembic runs a migration through module-global proxies (``alembic.context``, ``alembic.op``):
# two threads migrating at once (a command's progress watcher and its flow's tasks) break each
# other, so a process migrates one engine at a time.
_MIGRATE_LOCK = threading.Lock()

# ``Engine`` and ``Session`` are named here for the rest of the project's type hints, so that no
# module outside the inventory imports SQLAlchemy or SQLModel.
__all__ = ["Engine", "Session", "among", "bulk_insert", "is_postgres", "make_engine", "migrate",
           "refresh_statistics", "slices", "snapshot", "transaction"]


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()
            # Take the write lock at BEGIN, so that concurrent writers queue instead of failing
            # on lock upgrade (pysqlite's own BEGIN handling is switched off).
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True)


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """Yield a session inside one transaction: committed on success, rolled back on error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the latest Alembic revision."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _MIGRATE_LOCK, engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def is_postgres(bind: Engine | Connection) -> bool:
    return bind.dialect.name == "postgresql"



@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Session]:
    """Yield a session on one consistent snapshot, for reading while others append.

    PostgreSQL gets a REPEATABLE READ, READ ONLY transaction; SQLite's ``BEGIN IMMEDIATE``
    already keeps writers out while it lasts.
    """
    bind = engine
    if is_postgres(engine):
        bind = engine.execution_options(isolation_level="REPEATABLE READ",
                                        postgresql_readonly=True)
    with Session(bind, expire_on_commit=False) as session, session.begin():
        yield session


def among(session: Session, column: Any, values: Sequence[Any]) -> Any:
    """``column IN values`` for a slice of a bulk step; on PostgreSQL ``column = ANY(array)``.

    A list of hundreds of bound values costs PostgreSQL a plan per call, and where it scans a
    table it tests each row against the list one value at a time: a table that grew faster
    than its statistics (``refresh_statistics``) made the factory import's duplicate check a
    sequential scan costing 16 microseconds a row for a slice of 900 digests. One array
    value plans once and is matched through a hash table or an index. SQLite keeps the list
    (it has no arrays; ``slices`` keeps it under its 999 variables).
    """
    if is_postgres(session.get_bind()):
        return column == any_(literal(list(values), ARRAY(column.type)))
    return column.in_(values)


# A table's statistics are refreshed once this many rows of it changed since the last
# ANALYZE, plus this share of its rows (PostgreSQL's autovacuum: 50 rows and 10%, once a
# minute at most, too late for a bulk run that fills a new inventory within that minute).
# The planner scales a table's row count by its current size, so statistics taken once the
# table holds real rows stay good while it grows: refreshed each time it doubles, a table
# filled to 100,000 rows is analyzed at most seven times, each ANALYZE 50-100 ms.
STATS_MIN_CHANGES = 1000
STATS_SHARE = 1.0


def refresh_statistics(engine: Engine) -> list[str]:
    """On PostgreSQL, ANALYZE the inventory's tables whose rows changed by more than
    ``STATS_MIN_CHANGES`` plus ``STATS_SHARE`` of their size since their statistics were
    last taken; return their names. Nothing on SQLite (its planner takes the indexes it has).

    Bulk steps call it after each chunk commits. Without it, the tables of a new inventory
    grew from empty to hundreds of thousands of rows within one import, and the planner,
    still taking them for small, scanned them whole for every slice of a chunk: the import's
    time grew with the table, 0.33 s a slice at 20,000 key versions, 0.66 s at 40,000. A table
    another session is analyzing is left to it (the wait is bounded): statistics are an
    optimization, never a reason for a step to fail.
    """
    if not is_postgres(engine):
        return []
    with engine.connect() as conn:
        stale = [str(name) for (name,) in conn.execute(text(
            "SELECT s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
            "WHERE s.schemaname = current_schema() "
            "AND s.n_mod_since_analyze > :least + :share * greatest(c.reltuples, 0)"),
            {"least": STATS_MIN_CHANGES, "share": STATS_SHARE})]
        conn.rollback()  # end the read's transaction: each ANALYZE gets its own
        done = []
        for name in stale:
            try:
                with conn.begin():
                    conn.execute(text("SET LOCAL lock_timeout = '200ms'"))
                    # The name is a table of this schema, read from the catalog just above.
                    conn.execute(text(f'ANALYZE "{name}"'))
                done.append(name)
            except OperationalError:  # lock_timeout: another session is analyzing it
                continue
    return done


def slices(items: list[T], size: int = 900) -> Iterator[list[T]]:
    """``items`` in lists of ``size``: a bulk step's values, under SQLite's 999 variables."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


# SQLAlchemy's own storage format for DateTime on SQLite (sqlalchemy.dialects.sqlite.DATETIME).
_SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"


def bulk_insert(conn: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert many rows of the same shape in one round trip.

    On SQLite the rows go straight to the driver's ``executemany``, values converted as
    SQLAlchemy would store them (UTC datetimes in its text format): per-row parameter
    processing cost more than the insert itself. On PostgreSQL they go through ``COPY ... FROM
    STDIN`` in the caller's transaction (``_copy``). Elsewhere SQLAlchemy's executemany is used.
    Columns a row leaves out take the table's server default, as with a plain INSERT.
    """
    if not rows:
        return
    names = list(rows[0])
    unknown = set(names) - set(table.c.keys())
    if unknown:
        raise InventoryError(f"{table.name} has no columns {sorted(unknown)}")
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        _copy(conn, table, names, rows)
        return
    if conn.dialect.name != "sqlite":
        conn.execute(insert(table), rows)
        return
    # Identifiers are the table's own column names (checked above); values are bound.
    sql = (f"INSERT INTO {table.name} ({', '.join(names)}) "  # noqa: S608
           f"VALUES ({', '.join('?' for _ in names)})")
    columns = []
    for name in names:
        convert = _sqlite_converter(table.c[name].type)
        values = [row[name] for row in rows]
        columns.append([convert(v) for v in values] if convert else values)
    conn.exec_driver_sql(sql, list(zip(*columns, strict=True)))


def _copy(conn: Any, table: Any, names: list[str], rows: list[dict[str, Any]]) -> None:
    # COPY instead of INSERT: psycopg sends the rows as one stream and PostgreSQL parses no
    # statement per batch of values (a claim's inserts took half the database's time as
    # INSERT ... VALUES). Values are bound as SQLAlchemy would bind them (the columns' own bind
    # processors, for this dialect). The error a row raises is re-raised as SQLAlchemy's
    # (IntegrityError for a duplicate, and so on), as ``conn.execute`` would.
    import psycopg

    processors = [table.c[name].type.bind_processor(conn.dialect) for name in names]
    # Identifiers are the table's own column names (checked by the caller); values are streamed.
    sql = f"COPY {table.name} ({', '.join(names)}) FROM STDIN"
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        with cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row([convert(row[name]) if convert and row[name] is not None
                                else row[name]
                                for name, convert in zip(names, processors, strict=True)])
    except psycopg.Error as exc:
        raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    finally:
        cursor.close()


def _sqlite_converter(kind: Any) -> Any:
    # SQLModel wraps its types (UTCDateTime, AutoString) in TypeDecorators: look at the impl,
    # and do what their bind processing does (aware datetimes to naive UTC).
    kind = kind.impl if isinstance(kind, TypeDecorator) else kind
    if isinstance(kind, DateTime):
        return _sqlite_datetime
    if isinstance(kind, Boolean):
        return lambda v: None if v is None else int(v)
    if isinstance(kind, String):
        return lambda v: v if v is None or type(v) is str else str(v)
    return None


@functools.lru_cache(maxsize=256)
def _sqlite_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime(_SQLITE_DATETIME)
