"""Point Prefect at the meterkeys home before Prefect is imported."""

from __future__ import annotations

import os

from lifecycle.config import Settings


def configure(settings: Settings) -> None:
    """Keep Prefect's home (database, logs) under METERKEYS_HOME unless set otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
