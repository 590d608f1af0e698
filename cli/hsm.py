"""meterkeys hsm commands: initialise the token and its keys, status, check, backup, restore."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli import dual
from cli.common import authorize, console, engine, reports_errors, settings, signer
from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.errors import ConfigError
from lifecycle.hsm.check import PROTECTIONS
from lifecycle.identity import keys, request
from lifecycle.installation import steps
from lifecycle.inventory.db import transaction

app = typer.Typer(no_args_is_help=True, help="The HSM token, its long-lived keys and backups.")


def _authorize_init(name: str | None) -> Actor:
    """Return who runs ``hsm init``: on an inventory without principals, the first security
    officer, enrolled now with the configured key; afterwards a security officer's request.

    The first officer's enrolment is signed by its own key (proof of possession) and its name
    and key fingerprint are written to the trust anchor beside the audit witness, outside the
    inventory (``lifecycle.principals.enrol_root``); every later principal is enrolled by
    security officers' signatures that lead back to it.

    Raises:
        ConfigError: no principal key configured, or no name given for the first officer.
        AccessDenied: the principal may not initialise the HSM.
    """
    with transaction(engine()) as session:
        empty = not principals.list_principals(session)
    if not empty:
        return authorize("hsm.init")
    if not name:
        raise ConfigError("no principal is enrolled yet: name the first security officer with "
                          "--security-officer NAME (its key: METERKEYS_PRINCIPAL_KEY)")
    key = signer()
    pem = keys.normalize_pem(key.public_key_pem(), "METERKEYS_PRINCIPAL_KEY")
    params = {"name": name, "role": principals.SECURITY_OFFICER, "public_pem": pem}
    at = utcnow()
    signed = request.make("principal.enrol", params, name, principals.installation_id(engine()),
                          at, key)
    principals.enrol_root(engine(), settings(), signed, pem, at=at)
    console.print(f"principal [bold]{name}[/] enrolled as the first security officer "
                  f"(key {keys.fingerprint(pem)})")
    return Actor(name, principals.SECURITY_OFFICER)


@app.command("init")
@reports_errors
def init(keep_so_pin: bool = typer.Option(False, "--keep-so-pin",
                                          help="keep the generated SO PIN file (default: "
                                               "removed once the token is initialised)"),
         security_officer: str | None = typer.Option(
             None, "--security-officer",
             help="on a new installation: the name of the first security officer, whose key "
                  "is METERKEYS_PRINCIPAL_KEY")) -> None:
    """Create PIN files (embedded SoftHSM2 only), the token, its long-lived keys and the KEK
    canary; on a new installation, enrol the first security officer.

    Idempotent: what exists is reported as present and left alone.
    """
    s = settings()
    if keep_so_pin:
        s = s.model_copy(update={"keep_so_pin": True})
    actor = _authorize_init(security_officer)
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
           ) -> None:
    """Copy the token (never the PINs) into DEST/<UTC timestamp>/ as the next generation.

    The manifest lists every file's SHA-256 and the pinned long-lived keys, and is signed by the
    HSM audit key. Dual control: performed when a second security officer approves.
    """
    dual.request("hsm.backup", {"dest": str(dest.resolve())})


@app.command("restore")
@reports_errors
def restore(src: Path = typer.Argument(..., help="a backup directory (holds manifest.json)"),
            force: bool = typer.Option(False, "--force",
                                       help="restore an older or unrecorded generation (two "
                                            "security officers' decision, audited as forced)"),
            ) -> None:
    """Restore a signed token backup of the latest generation, then delete the replaced token.

    Refused unless the signature, the object set, the pinned keys and the storage KEK's
    known-answer check all pass; an older generation only with --force. Dual control:
    performed when a second security officer approves.
    """
    dual.request("hsm.restore", {"src": str(src.resolve()), "force": force})
