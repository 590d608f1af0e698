"""meterkeys hsm commands: initialise the token and its keys, status, check, backup, restore."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import authorize, console, engine, principal_name, reports_errors, settings
from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.hsm.check import PROTECTIONS
from lifecycle.installation import steps
from lifecycle.inventory.db import transaction

app = typer.Typer(no_args_is_help=True, help="The HSM token, its long-lived keys and backups.")


def _authorize_init() -> Actor:
    """Return who runs ``hsm init``; on an inventory without principals, the bootstrap: no check.

    As for the first principal (``lifecycle.principals``): with no principal enrolled, anyone
    who reaches the inventory could bypass a check, and the token must exist before any. The
    init is still audited, under the operating-system user (or METERKEYS_PRINCIPAL), no role.

    Raises:
        AccessDenied: the principal may not initialise the HSM.
    """
    with transaction(engine()) as session:
        if not principals.list_principals(session):
            return Actor(principal_name(), None)
    return authorize("hsm.init")


@app.command("init")
@reports_errors
def init(keep_so_pin: bool = typer.Option(False, "--keep-so-pin",
                                          help="keep the generated SO PIN file (default: "
                                               "removed once the token is initialised)")) -> None:
    """Create PIN files (embedded SoftHSM2 only), the token, its long-lived keys and the KEK canary.

    Idempotent: what exists is reported as present and left alone.
    """
    s = settings()
    if keep_so_pin:
        s = s.model_copy(update={"keep_so_pin": True})
    actor = _authorize_init()
    make_pins = s.is_softhsm and s.pin is None and s.pin_file is None and s.so_pin is None \
        and s.so_pin_file is None
    report = steps.init(s, engine(), make_pin_files=make_pins, actor=actor)
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


@app.command("check")
@reports_errors
def check() -> None:
    """Try each protection on the module, list its mechanisms and every long-lived key.

    Exits 1 when a needed mechanism is missing or a long-lived key is missing, not the pinned
    one, or weaker than policy (every process refuses to start then).
    """
    report = steps.hsm_check(settings(), engine())
    protections = Table("protection (tried on throw-away session objects)", "enforced")
    for name, enforced in report.protections.items():
        protections.add_row(PROTECTIONS[name], "yes" if enforced else "[yellow]no[/]")
    console.print(protections)
    mechanisms = Table("mechanism meterkeys needs", "offered")
    for name, offered in report.mechanisms.items():
        mechanisms.add_row(name, "yes" if offered else "[red]MISSING[/]")
    console.print(mechanisms)
    for key in report.keys:
        table = Table("attribute", *key.attributes, title=f"{key.role}: {key.label!r}")
        names = sorted({a for attrs in key.attributes.values() for a in attrs})
        for name in names:
            table.add_row(name, *(attrs.get(name, "-") for attrs in key.attributes.values()))
        console.print(table)
        console.print(f"[red]REFUSED[/]: {key.problem}" if key.problem else "[green]ok[/]")
    if report.failed:
        raise typer.Exit(1)


@app.command("backup")
@reports_errors
def backup(dest: Path = typer.Argument(..., help="directory that receives <UTC timestamp>/"),
           timeout: float = typer.Option(10.0, help="seconds to wait for the token lock")) -> None:
    """Copy the token (never the PINs) into DEST/<UTC timestamp>/ as the next generation.

    The manifest lists every file's SHA-256 and the pinned long-lived keys, and is signed by the
    HSM audit key.
    """
    actor = authorize("hsm.backup")
    result = steps.backup(settings(), engine(), actor, dest, timeout=timeout)
    console.print(f"token backed up to [bold]{result.path}[/] (generation {result.generation})")


@app.command("restore")
@reports_errors
def restore(src: Path = typer.Argument(..., help="a backup directory (holds manifest.json)"),
            force: bool = typer.Option(False, "--force",
                                       help="restore an older or unrecorded generation (a "
                                            "security officer's decision, audited as forced)"),
            timeout: float = typer.Option(10.0, help="seconds to wait for the token lock")) -> None:
    """Restore a signed token backup of the latest generation, then delete the replaced token.

    Refused unless the signature, the object set, the pinned keys and the storage KEK's
    known-answer check all pass; an older generation only with --force.
    """
    actor = authorize("hsm.restore")
    report = steps.restore(settings(), engine(), actor, src, force=force, timeout=timeout)
    console.print(f"token generation {report.generation} restored into "
                  f"[bold]{report.token_dir}[/] ({report.checked_keys} pinned keys and "
                  f"{report.checked_blobs} blobs checked)")
    if report.removed is not None:
        console.print("the previous token directory was deleted")
