"""meterkeys hsm commands: initialise the token and its keys, status, backup and restore."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import authorize, console, engine, reports_errors, settings
from lifecycle import principals
from lifecycle.installation import steps
from lifecycle.inventory.db import transaction

app = typer.Typer(no_args_is_help=True, help="The HSM token, its long-lived keys and backups.")


def _authorize_init() -> None:
    """``hsm init`` on an inventory without principals is the bootstrap: no check yet.

    As for the first principal (``lifecycle.principals``): with no principal enrolled, anyone
    who reaches the inventory could bypass a check, and the token must exist before any.

    Raises:
        AccessDenied: the principal may not initialise the HSM.
    """
    with transaction(engine()) as session:
        if not principals.list_principals(session):
            return
    authorize("hsm.init")


@app.command("init")
@reports_errors
def init() -> None:
    """Create PIN files (embedded SoftHSM2 only), the token, its long-lived keys and the KEK canary.

    Idempotent: what exists is reported as present and left alone.
    """
    s = settings()
    _authorize_init()
    make_pins = s.is_softhsm and s.pin is None and s.pin_file is None and s.so_pin is None \
        and s.so_pin_file is None
    report = steps.init(s, engine(), make_pin_files=make_pins)
    table = Table("item", "status")
    for item, state in report.items.items():
        table.add_row(item, state)
    console.print(table)


@app.command("status")
@reports_errors
def status() -> None:
    """Show the module, the token, its long-lived keys and the KEK canary."""
    table = Table("item", "value")
    for item, value in steps.status(settings(), engine()).items():
        table.add_row(item, value)
    console.print(table)


@app.command("backup")
@reports_errors
def backup(dest: Path = typer.Argument(..., help="directory that receives <UTC timestamp>/"),
           timeout: float = typer.Option(10.0, help="seconds to wait for the token lock")) -> None:
    """Copy the token (never the PINs) into DEST/<UTC timestamp>/ with a checksum manifest."""
    authorize("hsm.backup")
    where = steps.backup(settings(), engine(), dest, timeout=timeout)
    console.print(f"token backed up to [bold]{where}[/]")


@app.command("restore")
@reports_errors
def restore(src: Path = typer.Argument(..., help="a backup directory (holds manifest.json)"),
            timeout: float = typer.Option(10.0, help="seconds to wait for the token lock")) -> None:
    """Restore a token backup after proving it holds the inventory's storage KEK."""
    authorize("hsm.restore")
    report = steps.restore(settings(), engine(), src, timeout=timeout)
    console.print(f"token restored into [bold]{report.token_dir}[/] "
                  f"({report.checked_blobs} blobs checked)")
    if report.replaced is not None:
        console.print(f"the previous token was kept as {report.replaced}")
