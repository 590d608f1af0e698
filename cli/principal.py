"""meterkeys principal commands: enrol principals and list them."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import console, engine, fail, principal_name
from lifecycle import role
from lifecycle.errors import MeterkeysError
from lifecycle.inventory import transaction, utcnow

app = typer.Typer(no_args_is_help=True, help="Principals and their roles.")


@app.command()
def add(
    name: str = typer.Argument(..., help="principal name (as set in METERKEYS_PRINCIPAL)"),
    role_name: str = typer.Option(..., "--role", help=f"one of: {', '.join(role.ROLES)}"),
) -> None:
    """Add a principal; the very first one (a security-officer) needs no role check."""
    try:
        bootstrap = role.enroll(engine(), principal_name(), name, role_name, at=utcnow())
    except MeterkeysError as exc:
        raise fail(exc) from None
    how = " (bootstrap: first principal, audited as principal.bootstrap)" if bootstrap else ""
    console.print(f"principal {name!r} added as {role_name}{how}")


@app.command("list")
def list_principals() -> None:
    """List the principals and their roles."""
    try:
        role.authorize(engine(), principal_name(), "principal.read", at=utcnow())
        with transaction(engine()) as session:
            rows = role.list_principals(session)
    except MeterkeysError as exc:
        raise fail(exc) from None
    table = Table(title="principals")
    for column in ("name", "role", "disabled", "created (UTC)"):
        table.add_column(column)
    for p in rows:
        table.add_row(p.name, p.role, "yes" if p.disabled else "no",
                      p.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    console.print(table)
