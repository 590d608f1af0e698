"""Shared pieces of the command line: settings, engine, the acting principal, output."""

from __future__ import annotations

import getpass
import os
from functools import cache

import typer
from rich.console import Console
from sqlalchemy import Engine

from lifecycle.config import Settings, load_settings
from lifecycle.errors import MeterkeysError
from lifecycle.inventory import make_engine, migrate

console = Console()
err_console = Console(stderr=True)


@cache
def settings() -> Settings:
    """Read the settings once per command."""
    return load_settings()


@cache
def engine() -> Engine:
    """Open the inventory and bring its schema up to date."""
    eng = make_engine(settings().db_url)
    migrate(eng)
    return eng


def principal_name() -> str:
    """The principal acting: METERKEYS_PRINCIPAL, else the operating-system user."""
    return settings().principal or os.environ.get("USER") or getpass.getuser()


def fail(exc: MeterkeysError, code: int = 1) -> typer.Exit:
    """Print a project error (never a traceback) and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code)
