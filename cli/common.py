"""Shared pieces of the command line: settings, engine, the acting principal, output."""

from __future__ import annotations

import getpass
import os

import typer
from rich.console import Console
from sqlalchemy import Engine

from lifecycle.config import Settings
from lifecycle.errors import MeterkeysError
from tasks import context

console = Console()
err_console = Console(stderr=True)


def settings() -> Settings:
    """Read the settings once per command (the same cache the tasks use)."""
    return context.settings()


def engine() -> Engine:
    """Open the inventory once per command and bring its schema up to date."""
    return context.engine()


def principal_name() -> str:
    """The principal acting: METERKEYS_PRINCIPAL, else the operating-system user."""
    return settings().principal or os.environ.get("USER") or getpass.getuser()


def fail(exc: MeterkeysError, code: int = 1) -> typer.Exit:
    """Print a project error (never a traceback) and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code)
