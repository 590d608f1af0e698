"""Per-process context of the tasks: settings, inventory engine, retry rule, the clock."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

from prefect import runtime

from lifecycle.clock import utcnow
from lifecycle.config import Settings, load_settings
from lifecycle.errors import TransientHsmError
from lifecycle.inventory.db import Engine, make_engine, migrate


@cache
def settings() -> Settings:
    """Read the settings once per process (at the edge, not at import)."""
    return load_settings()


@cache
def engine() -> Engine:
    """Open the inventory once per process and bring its schema up to date."""
    eng = make_engine(settings().db_url)
    migrate(eng)
    return eng


def reset() -> None:
    """Forget the cached settings and engine (tests switch homes and databases)."""
    if engine.cache_info().currsize:
        engine().dispose()
    engine.cache_clear()
    settings.cache_clear()


def now() -> datetime:
    """The clock of the tasks (the project's one clock)."""
    return utcnow()


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transient HSM errors only."""
    try:
        state.result()
    except TransientHsmError:
        return True
    except Exception:  # noqa: BLE001 - anything else is permanent
        return False
    return False


def flow_run_id() -> str | None:
    """The id of the flow run this task belongs to, if any."""
    value = runtime.flow_run.id
    return str(value) if value else None
