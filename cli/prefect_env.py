"""Point Prefect at the meterkeys home before Prefect is imported."""

from __future__ import annotations

import os
from pathlib import Path

from lifecycle.config import load_settings, private_umask

EPHEMERAL_STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_STARTUP_SECONDS = 180


def configure() -> None:
    """Keep Prefect's home (database, logs) under METERKEYS_HOME unless set otherwise.

    Prefect reads its settings when it is first imported, so this runs before any module of
    the command line imports it (``cli/__init__.py``).
    """
    # Everything the command line creates (home, token, PIN files, inventory, backups) is
    # private to its owner: set before the first directory is made.
    private_umask()
    settings = load_settings()
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # A command that runs a flow starts Prefect's ephemeral server, and a fresh Prefect home
    # first creates its database: about 30 s on a slow 2-core machine, where Prefect's own wait
    # of 20 s made the demo's first import fail on a fresh clone.
    os.environ.setdefault(EPHEMERAL_STARTUP_ENV, str(EPHEMERAL_STARTUP_SECONDS))
