"""meterkeys principal commands: enrol principals and list them."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import authorize, console, engine, principal_name, reports_errors
from lifecycle import principals
from lifecycle.clock import utcnow
from lifecycle.inventory.db import transaction

app = typer.Typer(no_args_is_help=True, help="Principals and their roles.")


@app.command()
@reports_errors
def add(
    name: str = typer.Argument(..., help="principal name (as set in METERKEYS_PRINCIPAL)"),
    role_name: str = typer.Option(..., "--role", help=f"one of: {', '.join(principals.ROLES)}"),
) -> None:
    """Add a principal; the very first one (a security-officer) needs no role check."""
    bootstrap = principals.enroll(engine(), principal_name(), name, role_name, at=utcnow())
    how = " (bootstrap: first principal, audited as principal.bootstrap)" if bootstrap else ""
    console.print(f"principal {name!r} added as {role_name}{how}")


@app.command("list")
@reports_errors
def list_principals() -> None:
    """List the principals and their roles."""
    authorize("principal.read")
    with transaction(engine()) as session:
        rows = principals.list_principals(session)
    table = Table(title="principals")
    for column in ("name", "role", "disabled", "created (UTC)"):
        table.add_column(column)
    for p in rows:
        table.add_row(p.name, p.role, "yes" if p.disabled else "no",
                      p.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    console.print(table)
