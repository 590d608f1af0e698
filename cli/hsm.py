"""meterkeys hsm commands: initialise the token and its keys, status, backup and restore."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import console, engine, fail, principal_name, settings
from lifecycle import backup as backup_ops
from lifecycle import hsm_token, inventory, role
from lifecycle.errors import MeterkeysError

app = typer.Typer(no_args_is_help=True, help="The HSM token, its long-lived keys and backups.")


def _authorize(action: str, *, bootstrap_allowed: bool = False) -> None:
    """Check the principal's role; ``hsm init`` on an inventory without principals is bootstrap.

    Raises:
        AccessDenied: the principal may not perform the action.
    """
    if bootstrap_allowed:
        # As for the first principal (lifecycle.role): with no principal enrolled, anyone who
        # reaches the inventory could bypass a check, and the token must exist before any.
        with inventory.transaction(engine()) as session:
            if not role.list_principals(session):
                return
    role.authorize(engine(), principal_name(), action, at=inventory.utcnow())


@app.command("init")
def init() -> None:
    """Create PIN files (embedded SoftHSM2 only), the token, its long-lived keys and the KEK canary.

    Idempotent: what exists is reported as present and left alone.
    """
    s = settings()
    table = Table("item", "status")
    try:
        _authorize("hsm.init", bootstrap_allowed=True)
        if s.is_softhsm and s.pin is None and s.pin_file is None and s.so_pin is None \
                and s.so_pin_file is None:
            made = {p.name for p in hsm_token.generate_pin_files(s)}
            for name in ("so.pin", "user.pin"):
                table.add_row(f"PIN file {name}", "created" if name in made else "present")
        created = hsm_token.init_token(s)
        table.add_row(f"token {s.token_label!r}", "created" if created else "present")
        for label, status in hsm_token.ensure_long_lived_keys(s).items():
            table.add_row(f"key {label!r}", status)
        canary = backup_ops.ensure_kek_check(s, engine())
        table.add_row(f"KEK canary for {s.storage_kek_label!r}",
                      "created" if canary else "present")
    except MeterkeysError as exc:
        raise fail(exc) from None
    console.print(table)


@app.command("status")
def status() -> None:
    """Show the module, the token, its long-lived keys and the KEK canary."""
    from lifecycle.hsm import Hsm

    s = settings()
    table = Table("item", "value")
    try:
        table.add_row("PKCS#11 module", str(s.module_path))
        if s.is_softhsm:
            table.add_row("token directory", str(s.token_dir))
        present = hsm_token.token_exists(s)
        table.add_row(f"token {s.token_label!r}", "present" if present else "absent")
        if present:
            keys = Hsm.open(s).has_token_keys(s.storage_kek_label, s.audit_key_label)
            for label, found in keys.items():
                table.add_row(f"key {label!r}", "present" if found else "absent")
        with inventory.transaction(engine()) as session:
            canary = inventory.get_kek_check(session, s.storage_kek_label)
        table.add_row(f"KEK canary for {s.storage_kek_label!r}",
                      "present" if canary is not None else "absent")
    except MeterkeysError as exc:
        raise fail(exc) from None
    console.print(table)


@app.command("backup")
def backup(dest: Path = typer.Argument(..., help="directory that receives <UTC timestamp>/"),
           timeout: float = typer.Option(10.0, help="seconds to wait for the token lock")) -> None:
    """Copy the token (never the PINs) into DEST/<UTC timestamp>/ with a checksum manifest."""
    try:
        _authorize("hsm.backup")
        where = backup_ops.backup(settings(), engine(), dest, timeout=timeout)
    except MeterkeysError as exc:
        raise fail(exc) from None
    console.print(f"token backed up to [bold]{where}[/]")


@app.command("restore")
def restore(src: Path = typer.Argument(..., help="a backup directory (holds manifest.json)"),
            timeout: float = typer.Option(10.0, help="seconds to wait for the token lock")) -> None:
    """Restore a token backup after proving it holds the inventory's storage KEK."""
    try:
        _authorize("hsm.restore")
        report = backup_ops.restore(settings(), engine(), src, timeout=timeout)
    except MeterkeysError as exc:
        raise fail(exc) from None
    console.print(f"token restored into [bold]{report.token_dir}[/] "
                  f"({report.checked_blobs} blobs checked)")
    if report.replaced is not None:
        console.print(f"the previous token was kept as {report.replaced}")
