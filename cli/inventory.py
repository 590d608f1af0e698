"""meterkeys inventory commands: verify that every key blob is bound to its meter."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from cli.common import authorize, console, engine, err_console, reports_errors, settings
from lifecycle.clock import utcnow
from lifecycle.meter_keys import custody

app = typer.Typer(no_args_is_help=True, help="The inventory's key blobs.")

EXIT_BAD = 2
SHOWN = 50


@app.command()
@reports_errors
def verify() -> None:
    """Check the HSM MAC of every key blob (exit 2 when one is moved, swapped or planted)."""
    actor = authorize("inventory.verify")
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("verifying key blobs", total=None)
        report = custody.verify_all(
            settings(), engine(), actor, utcnow(),
            lambda done, total: progress.update(task, completed=done, total=total))
    if not report.bad:
        console.print(f"{report.checked} key blobs verified: each bound to its meter, key id, "
                      "version and KEK")
        return
    table = Table("meter", "key id", "version", "reason",
                  title=f"{len(report.bad)} of {report.checked} key blobs fail")
    for bad in report.bad[:SHOWN]:
        table.add_row(bad.serial, str(bad.key_id), str(bad.version), bad.reason)
    console.print(table)
    raise typer.Exit(EXIT_BAD)
