"""Per-process context of the tasks: settings, inventory engine, retry rule, the clock."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

from prefect import runtime

from lifecycle.clock import utcnow
from lifecycle.config import Settings, ensure_private_home, load_settings, private_umask
from lifecycle.errors import TransientHsmError
from lifecycle.inventory.db import Engine, make_engine, migrate


@cache
def settings() -> Settings:
    """Read the settings once per process (at the edge, not at import), under umask 077.

    Raises:
        ConfigError: the state directory is open to other users.
    """
    private_umask()
    loaded = load_settings()
    ensure_private_home(loaded)
    return loaded


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
