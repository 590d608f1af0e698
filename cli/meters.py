"""meterkeys meters commands: read the inventory (never key material)."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import console, engine, reports_errors
from lifecycle.inventory import meters
from lifecycle.inventory.db import transaction
from lifecycle.policy import KeyId

app = typer.Typer(no_args_is_help=True, help="The meter inventory.")


@app.command("list")
@reports_errors
def list_meters(limit: int = typer.Option(50, help="rows to show"),
                offset: int = typer.Option(0, help="rows to skip"),
                state: str | None = typer.Option(None, help="only meters in this state")) -> None:
    """List meters by serial."""
    with transaction(engine()) as session:
        rows = meters.list_meters(session, limit=limit, offset=offset, state=state)
        total = meters.count_meters(session)
    table = Table("serial", "system title", "suite", "state", "batch", "row",
                  title=f"{total} meters")
    for m in rows:
        table.add_row(m.serial, m.system_title, str(m.suite), m.state, str(m.batch_id),
                      str(m.source_row))
    console.print(table)


@app.command("show")
@reports_errors
def show(serial: str) -> None:
    """Show one meter and its key versions (states and dates, never key material)."""
    with transaction(engine()) as session:
        meter = meters.get_meter(session, serial)
        versions = meters.key_versions(session, int(meter.id or 0))
    console.print(f"[bold]{meter.serial}[/]  system title {meter.system_title}  suite "
                  f"{meter.suite}  state {meter.state}  batch {meter.batch_id} row "
                  f"{meter.source_row}  factory certificate: "
                  f"{'yes' if meter.factory_certificate else 'no'}")
    table = Table("key", "version", "state", "KEK", "origin", "activated", "expires")
    for v in versions:
        table.add_row(KeyId(v.key_id).name, str(v.version), v.state, v.kek_label, v.origin,
                      f"{v.activated_at:%Y-%m-%d}" if v.activated_at else "-",
                      f"{v.expires_at:%Y-%m-%d}" if v.expires_at else "-")
    console.print(table)
