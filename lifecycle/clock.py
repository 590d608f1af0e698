"""The one clock of the project, read at the edge (tasks, CLI) and passed into every rule."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Return the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
