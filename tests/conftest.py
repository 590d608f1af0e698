"""Shared fixtures: one real SoftHSM2 token per test session, inventories on SQLite and
PostgreSQL (when reachable), one Prefect test server for the flow tests."""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Before anything imports prefect: keep its home, logs and results inside the test session.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="meterkeys-test-"))
# The session's directory holds a token, its PIN files, principals' keys and inventories: it
# goes when the session's process ends (each xdist worker has its own), unless
# METERKEYS_TEST_KEEP_DIR is set to look into it afterwards.
if not os.environ.get("METERKEYS_TEST_KEEP_DIR"):
    atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
# The command line sets Prefect's log level to WARNING when it is imported, unless one is set:
# the tests read the flow runs' INFO lines, so the session sets its own.
os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
os.environ["METERKEYS_HOME"] = str(_SESSION_DIR / "home")
os.environ.pop("METERKEYS_PIN", None)
os.environ.pop("METERKEYS_DATABASE_URL", None)
# The secrets scan looks for the SO PIN too, so the session keeps its file (hsm init removes
# it by default; tests/integration/installation/test_files.py covers that).
os.environ["METERKEYS_KEEP_SO_PIN"] = "true"

from tests.identities import Identities  # noqa: E402 - after the environment above is set

PG_URL = os.environ.get("METERKEYS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def settings():  # type: ignore[no-untyped-def]
    """Settings of the test session's embedded home, with an initialised token and keys."""
    from lifecycle.config import load_settings
    from lifecycle.hsm import provision

    s = load_settings()
    provision.generate_pin_files(s)
    provision.init_token(s)
    provision.ensure_long_lived_keys(s)
    return s


@pytest.fixture(scope="session")
def hsm(settings):  # type: ignore[no-untyped-def]
    from lifecycle.hsm.connection import Hsm

    return Hsm.open(settings)


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty inventory database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'inventory.db'}"
        return
    with pg_schema() as url:
        yield url


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for one test, dropped afterwards (skips when unreachable)."""
    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    import psycopg

    schema = f"mk_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def engine(db_url: str):  # type: ignore[no-untyped-def]
    from lifecycle.inventory.db import make_engine, migrate

    eng = make_engine(db_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One Prefect test server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@functools.cache
def _prefect_heartbeat_seconds() -> Any:
    """Prefect's own ``FlowRunEngine.heartbeat_seconds`` (looked up before any test sets it)."""
    from prefect.flow_engine import FlowRunEngine

    return inspect.getattr_static(FlowRunEngine, "heartbeat_seconds")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Flow runs in the tests send no heartbeat, unless a test is marked ``prefect_heartbeats``.

    Prefect (3.9) sends a flow run's heartbeats from a thread that sleeps in one-second steps
    and is joined when the run ends, so every flow run lasted at least about 1.1 s, one of
    0.1 s included. The tests run hundreds of flows in-process, and nothing in meterkeys
    reads heartbeats (they let a Prefect automation notice a crashed run). The leak scans
    keep them: they look for keys in everything Prefect stores, heartbeat events included.
    Set before the test's fixtures run, so that the flows they run are covered too."""
    if "prefect_server" not in getattr(item, "fixturenames", ()):
        return
    from prefect.flow_engine import FlowRunEngine

    own = _prefect_heartbeat_seconds()
    on = item.get_closest_marker("prefect_heartbeats") is not None
    FlowRunEngine.heartbeat_seconds = own if on else property(lambda _engine: None)  # type: ignore[method-assign, assignment]


@pytest.fixture(scope="session")
def manufacturers(session_dir: Path):  # type: ignore[no-untyped-def]
    """Simulated manufacturers (signing keys, factory CAs) shared by the session, by vendor."""
    from simulator.manufacturer import Manufacturer

    curves = {"acme": "P-256", "borealis": "P-384", "cygnus": "P-256", "delta": "P-256"}
    return {v: Manufacturer.create(session_dir / "manufacturers" / v, v, c)
            for v, c in curves.items()}


MAPPINGS = Path(__file__).resolve().parent.parent / "simulator" / "mappings"


@pytest.fixture
def fleet(settings, engine, db_url, manufacturers, monkeypatch):  # type: ignore[no-untyped-def]
    """An inventory ready to import: principals enrolled with keys (``tests.identities``), four
    vendors onboarded with their HSM import keys, and the task context pointed at this test's
    database. The settings carry this test's witness folder (the principals' anchor is there)."""
    from lifecycle.factory_import.vendor import ensure_import_key
    from lifecycle.installation import steps as installation
    from lifecycle.inventory import db, hsm_keys, vendors
    from tasks import context

    monkeypatch.setenv("METERKEYS_DATABASE_URL", db_url)
    # Each test's inventory is an installation of its own, so it gets an audit witness of its own.
    witness = tempfile.mkdtemp(dir=_SESSION_DIR, prefix="witness-")
    monkeypatch.setenv("METERKEYS_WITNESS_DIR", witness)
    settings = settings.model_copy(update={"witness_dir": Path(witness)})
    context.reset()
    ids = Identities(settings, engine, Path(tempfile.mkdtemp(dir=_SESSION_DIR, prefix="keys-")))
    ids.bootstrap()
    with db.transaction(engine) as session:
        pin = audit_pin(settings)  # as hsm init pins it: audit verify checks the key against it
        hsm_keys.put_pin(session, pin.role, pin.label, pin.key_id, pin.check_value)
    # As `meterkeys hsm init` does for an installation: pin every long-lived key of the session
    # token in this test's inventory, so that flows find their keys pinned.
    installation.init(settings, engine, make_pin_files=False)
    keys = {}
    for vendor, maker in manufacturers.items():
        with db.transaction(engine) as session:
            vendors.add_vendor(session, vendor, maker.signing_public_pem(),
                                 (MAPPINGS / f"{vendor}.toml").read_text(encoding="utf-8"))
        pem, oaep = ensure_import_key(engine, settings, vendor)
        keys[vendor] = (pem.decode(), oaep)
    yield Fleet(settings, engine, db_url, manufacturers, keys, ids)
    context.reset()


def audit_pin(settings):  # type: ignore[no-untyped-def]
    """The audit key's pin (role, label, CKA_ID, check value), read from the session token."""
    from lifecycle.hsm import provision

    return next(s.pin for s in provision.ensure_keys(settings) if s.role == "audit-signing")


class Fleet:
    """What a factory-import test needs: settings, engine, makers, import keys, principals."""

    def __init__(self, settings, engine, db_url, manufacturers, keys, ids):  # type: ignore[no-untyped-def]
        self.settings = settings
        self.engine = engine
        self.db_url = db_url
        self.makers = manufacturers
        self.keys = keys
        self.ids: Identities = ids

    def batch(self, vendor: str, out: Path, count: int, **kwargs):  # type: ignore[no-untyped-def]
        """Generate a batch of ``count`` meters for ``vendor`` into ``out``."""
        pem, oaep = self.keys[vendor]
        return self.makers[vendor].make_batch(
            out=out, mapping_path=MAPPINGS / f"{vendor}.toml", import_public_pem=pem,
            oaep_hash=oaep, count=count, **kwargs)

    def run(self, files, vendor: str, principal: str = "test-operator", workers: int = 0):  # type: ignore[no-untyped-def]
        """Run the factory-import flow with a request signed by ``principal``; return its final
        state. The request covers the flow's parameters exactly as the flow computes them."""
        from flows.factory_import import factory_import

        file = str(files.data if hasattr(files, "data") else files)
        params = {"file": file, "vendor": vendor, "mapping": None, "workers": workers}
        signed = self.ids.requests([principal], "batch.import", params)
        return factory_import(file=file, vendor=vendor, workers=workers, request=signed,
                              return_state=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the test files: the leak scans, then the files with a test marked ``slow``, then
    the rest as collected. ``make test`` runs a file at a time on each process in this order
    (pytest-xdist ``--dist loadfile --no-loadscope-reorder``).

    The leak scans read Prefect's whole database, file by file and row by row, for every form
    of every simulated key; run late, that database holds every earlier test's flow runs too,
    and the scans took 100 s each for nothing more to find. The factory import's scan comes
    first, the claim's (ceremony, claim, approval) right after it. The slow files (a minute or
    more each: the kill tests, the malformed batches...) start next, so that the short files
    fill the processes' last minutes. xdist's own order (most tests first) undid all this: the
    scans ran late (158 and 83 s, against 26 and 34 s first), and one process ran both kill
    tests alone for 200 s at the end while the other had finished."""
    leak_scans = ("integration/secrets/test_no_secrets.py",
                  "integration/secrets/test_claim_secrets.py")
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        scan = next((i for i, name in enumerate(leak_scans) if path.endswith(name)), None)
        if scan is not None:
            return scan
        return len(leak_scans) + (0 if item.path in slow else 1)

    items.sort(key=rank)
