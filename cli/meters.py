"""meterkeys meters commands: read the inventory (never key material)."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import console, engine, fail, principal_name
from lifecycle import inventory, role
from lifecycle.errors import MeterkeysError
from lifecycle.policy import KeyId

app = typer.Typer(no_args_is_help=True, help="The meter inventory.")


@app.command("list")
def list_meters(limit: int = typer.Option(50, help="rows to show"),
                offset: int = typer.Option(0, help="rows to skip"),
                state: str | None = typer.Option(None, help="only meters in this state")) -> None:
    """List meters by serial."""
    try:
        role.authorize(engine(), principal_name(), "meter.read", at=inventory.utcnow())
    except MeterkeysError as exc:
        raise fail(exc) from None
    with inventory.transaction(engine()) as session:
        meters = inventory.list_meters(session, limit=limit, offset=offset, state=state)
        total = inventory.count_meters(session)
    table = Table("serial", "system title", "suite", "state", "batch", "row",
                  title=f"{total} meters")
    for m in meters:
        table.add_row(m.serial, m.system_title, str(m.suite), m.state, str(m.batch_id),
                      str(m.source_row))
    console.print(table)


@app.command("show")
def show(serial: str) -> None:
    """Show one meter and its key versions (states and dates, never key material)."""
    try:
        role.authorize(engine(), principal_name(), "meter.read", at=inventory.utcnow())
        with inventory.transaction(engine()) as session:
            meter = inventory.get_meter(session, serial)
            versions = inventory.key_versions(session, int(meter.id or 0))
    except MeterkeysError as exc:
        raise fail(exc) from None
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
