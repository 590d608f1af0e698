"""meterkeys principal commands: make a key, enrol and disable principals, list them.

A principal is a name, a role and a public key (ECDSA P-256 or Ed25519). Enrolling or disabling
one is a security-officer action under dual control: the first officer's command leaves a
request, a second officer approves it with ``meterkeys approve``.
"""

from __future__ import annotations

import getpass
from pathlib import Path

import typer
from rich.table import Table

from cli import dual
from cli.common import console, engine, reports_errors, settings, sign, signer
from lifecycle import principals
from lifecycle.clock import utcnow
from lifecycle.errors import ConfigError, MeterkeysError
from lifecycle.identity import keys, signers
from lifecycle.inventory.db import transaction

app = typer.Typer(no_args_is_help=True, help="Principals: their keys and roles.")


@app.command()
@reports_errors
def keygen(name: str = typer.Argument(..., help="the principal's name"),
           out: Path = typer.Option(Path("."), help="folder for NAME.key.pem and NAME.pub.pem"),
           ed25519: bool = typer.Option(False, "--ed25519", help="Ed25519 instead of P-256"),
           passphrase: bool = typer.Option(True, "--passphrase/--no-passphrase",
                                           help="encrypt the private key (asks for a "
                                                "passphrase; --no-passphrase only for tests)"),
           ) -> None:
    """Make a principal's key pair: the private key stays with the principal (mode 0600),
    the public key goes to the security officers for enrolment."""
    secret = _new_passphrase() if passphrase else None
    private, public = signers.generate(out, name, "ed25519" if ed25519 else "p256", secret)
    console.print(f"private key: {private} (keep it; set METERKEYS_PRINCIPAL_KEY to it)")
    console.print(f"public key:  {public} (fingerprint "
                  f"{keys.fingerprint(public.read_bytes())}); enrol it with "
                  f"meterkeys principal enrol {name} --role ROLE --public-key {public}")


def _new_passphrase() -> bytes:
    first = getpass.getpass("passphrase for the new key: ")
    if len(first) < 12:
        raise ConfigError("the passphrase needs at least 12 characters")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passphrases differ")
    return first.encode()


@app.command()
@reports_errors
def enrol(name: str = typer.Argument(..., help="the principal's name"),
          role_name: str = typer.Option(..., "--role",
                                        help=f"one of: {', '.join(principals.ROLES)}"),
          public_key: Path = typer.Option(..., "--public-key", exists=True, dir_okay=False,
                                          help="the principal's public key (PEM)")) -> None:
    """Enrol a principal with its public key and role (dual control).

    The one exception: while the first security officer is the only one, it enrols the second
    security officer alone, once (recorded in the trust anchor beside the witness).
    """
    params = principals.enrolment_params(name, role_name, public_key.read_text(encoding="ascii"))
    if role_name == principals.SECURITY_OFFICER and _officers() == 1:
        principals.enrol(engine(), settings(), [sign(principals.ENROL, params)], name, role_name,
                         params["public_pem"], at=utcnow())
        console.print(f"principal {name!r} enrolled as the second security officer; from now "
                      "on every security-officer action needs two of them")
        return
    dual.request(principals.ENROL, params)


def _officers() -> int:
    with transaction(engine()) as session:
        return sum(1 for p in principals.list_principals(session)
                   if p.role == principals.SECURITY_OFFICER and not p.disabled)


@app.command()
@reports_errors
def disable(name: str = typer.Argument(..., help="the principal to disable")) -> None:
    """Disable a principal: its signatures are refused from then on (dual control)."""
    dual.request(principals.DISABLE, {"name": name})


@app.command()
@reports_errors
def whoami() -> None:
    """Show the principal whose key is configured (METERKEYS_PRINCIPAL_KEY)."""
    pem = signer().public_key_pem()
    name = principals.signer_name(engine(), pem)
    with transaction(engine()) as session:
        verified = principals.verify_principal(session, settings(), name)
    console.print(f"{verified.name} ({verified.role}), key {verified.fingerprint}")


@app.command("list")
@reports_errors
def list_principals() -> None:
    """List the principals, their roles and keys, and whether each enrolment verifies."""
    with transaction(engine()) as session:
        rows = principals.list_principals(session)
        checks = [_check(session, p.name) for p in rows]
    table = Table("name", "role", "key fingerprint", "disabled", "enrolment", "since (UTC)",
                  title="principals")
    for p, check in zip(rows, checks, strict=True):
        table.add_row(p.name, p.role, p.fingerprint or "-", "yes" if p.disabled else "no",
                      check, p.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    console.print(table)


def _check(session: object, name: str) -> str:
    try:
        principals.verify_principal(session, settings(), name)  # type: ignore[arg-type]
    except MeterkeysError as exc:
        return f"[red]REFUSED[/]: {exc}"
    return "[green]verified[/]"
