"""Shared pieces of the command line: settings, engine, the acting principal, output, errors."""

from __future__ import annotations

import functools
import getpass
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.errors import MeterkeysError
from lifecycle.inventory.db import Engine
from tasks import context

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def settings() -> Settings:
    """Read the settings once per command (the same cache the tasks use)."""
    return context.settings()


def engine() -> Engine:
    """Open the inventory once per command and bring its schema up to date."""
    return context.engine()


def principal_name() -> str:
    """The principal acting: METERKEYS_PRINCIPAL, else the operating-system user."""
    return settings().principal or os.environ.get("USER") or getpass.getuser()


def authorize(action: str) -> Actor:
    """Check that the acting principal may perform the action (a refusal is audited).

    Raises:
        AccessDenied: the principal may not.
    """
    return principals.authorize(engine(), principal_name(), action, at=utcnow())


def fail(exc: MeterkeysError, code: int = 1) -> typer.Exit:
    """Print a project error (never a traceback) and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)  # one line, any width
    return typer.Exit(code)


def reports_errors(command: F) -> F:
    """Turn a project error raised by a command into its one-line message and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MeterkeysError as exc:
            raise fail(exc) from None

    return wrapper  # type: ignore[return-value]
