"""What a benchmark runs on: a home of its own, and an inventory (SQLite in that home, or a fresh
PostgreSQL schema).

``home_dir`` gives a run a temporary home, removed when the run ends, unless ``--home`` names one
to keep: a benchmark's home holds a SoftHSM2 token, its PIN files and a whole inventory, which
would otherwise pile up in the temporary directory run after run.

``--database-url postgresql://USER@HOST:5432/DB`` runs a benchmark on PostgreSQL, as a DSO at
scale would: the run gets a schema of its own in that database (``bench_`` and 12 hex digits),
reached through the URL's ``search_path`` and dropped when the run ends, so runs never see each
other's rows. ``ServerCpu`` reads the processor time of the PostgreSQL server's processes when
they run on this machine (psutil sees them), so that a benchmark can count the database's share
of the work.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil


@contextlib.contextmanager
def home_dir(given: Path | None, prefix: str) -> Iterator[Path]:
    """Yield ``given`` (kept), or a new private temporary directory removed at the end."""
    if given is not None:
        given.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the home must be
        yield given
        return
    home = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def add_home_option(parser: argparse.ArgumentParser) -> None:
    """``--home``, as every benchmark that can keep its state takes it."""
    parser.add_argument("--home", type=Path, default=None,
                        help="state dir, kept (default: a temporary one, removed at the end)")


def add_database_option(parser: argparse.ArgumentParser) -> None:
    """``--database-url``, as every benchmark on the inventory takes it."""
    parser.add_argument("--database-url", default=None,
                        help="run on PostgreSQL: postgresql://USER@HOST:PORT/DB (the run gets "
                             "a schema of its own there, dropped at the end; default: SQLite)")


@contextlib.contextmanager
def inventory_url(url: str | None) -> Iterator[str | None]:
    """Yield the database URL to run on: ``None`` (SQLite in the home) for ``None``, the URL of
    a fresh schema for a PostgreSQL URL (dropped afterwards).

    Raises:
        SystemExit: the URL is neither empty nor PostgreSQL.
    """
    if url is None:
        yield None
        return
    if not url.startswith("postgresql"):
        raise SystemExit(f"--database-url {url.split('://')[0]}://...: only PostgreSQL URLs "
                         "(SQLite is the default, in the benchmark's home)")
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
    schema = f"bench_{secrets.token_hex(6)}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    joiner = "&" if "?" in url else "?"
    try:
        yield f"{url}{joiner}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


class ServerCpu:
    """Processor seconds the PostgreSQL server's processes on this machine spend between
    ``start()`` and ``seconds()``: each process's time since the start (a backend started
    meanwhile counts whole). A backend that ends in between is missed: the inventory's
    connections stay open in their pool for the run, so few do. Zero when the server runs
    elsewhere."""

    def __init__(self) -> None:
        self._start: dict[int, float] = {}

    def start(self) -> ServerCpu:
        self._start = _cpu_by_pid()
        return self

    def seconds(self) -> float:
        return sum(cpu - self._start.get(pid, 0.0) for pid, cpu in _cpu_by_pid().items())


def _cpu_by_pid() -> dict[int, float]:
    out = {}
    for process in psutil.process_iter(["name"]):
        if process.info["name"] in ("postgres", "postmaster"):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                out[process.pid] = times.user + times.system
    return out
