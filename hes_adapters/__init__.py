"""Which Head End System a process talks to: the one factory of ``lifecycle.hes.port.Hes``.

The port lives in ``lifecycle.hes`` and knows no adapter; the simulator's HES lives in
``simulator`` and may never be imported by the layers that run in production
(``tests/unit/architecture``: lifecycle, tasks, flows and deployments never import simulator).
This package is the one place that picks an adapter from the ``hes`` setting, beside the
command line: tasks (for the flow) and cli may import it, and it imports the simulator only to
offer ``simulated:<dir>``. A production HES adapter (an API client) would be added here too.

    file:<dir>        FileHes: orders.jsonl kept there for a real HES (each chunk added,
                      docs/hes-files.md), outcomes.jsonl read
    simulated:<dir>   SimulatedHes: the simulator's meters, state kept in <dir>
"""

from __future__ import annotations

from pathlib import Path

from lifecycle.config import Settings
from lifecycle.errors import ConfigError
from lifecycle.hes.files import FileHes
from lifecycle.hes.port import Hes
from simulator.hes import STATE_FILE, SimulatedHes
from simulator.manufacturer import SECRETS_SUFFIX

ORDERS_FILE, OUTCOMES_FILE = "orders.jsonl", "outcomes.jsonl"


def open_hes(settings: Settings) -> Hes:
    """Return the HES the settings name.

    Raises:
        ConfigError: no HES configured, or an unknown kind.
    """
    if not settings.hes:
        raise ConfigError("no HES configured: set METERKEYS_HES to file:<dir> (a real HES "
                          "exchanging JSON lines) or simulated:<dir> (the simulator)")
    kind, _, where = settings.hes.partition(":")
    folder = Path(where).expanduser().resolve()
    if kind == "file":
        return FileHes(folder / ORDERS_FILE, folder / OUTCOMES_FILE)
    if kind == "simulated":
        return simulated(settings, folder)
    raise ConfigError(f"unknown HES kind {kind!r}: file or simulated")


def simulated(settings: Settings, folder: Path) -> SimulatedHes:
    """Open the simulated HES in ``folder``: its saved state, or the meters of every
    meter-secrets file under the simulation home on first use."""
    if (folder / STATE_FILE).exists():
        return SimulatedHes.load(folder)
    home = settings.simulation_dir
    files = sorted(home.rglob(f"*{SECRETS_SUFFIX}")) if home.exists() else []
    return SimulatedHes.open(folder, files, engine="cryptography")


def csr(hes: Hes, serial: str, usage: str) -> bytes | None:
    """Return a meter's CSR (PEM) for ``usage`` through the HES, or None when the HES cannot
    fetch one (the port has no CSR request yet: only the simulated HES offers it)."""
    if isinstance(hes, SimulatedHes) and serial in hes.meters:
        return hes.meters[serial].csr(usage)
    return None
