"""meterkeys orders: key orders for a real HES through files (JSON lines), and its outcomes.

``export`` writes every order still waiting for an outcome (wrapped keys and challenges only;
never a key in clear); ``confirm`` reads the HES's outcomes and settles them as the flow does:
only a proof checked in the HSM changes a key. Both are signed (action meter.claim) and audited.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer

from cli.common import authorize, console, engine, reports_errors, settings
from lifecycle.claim import steps
from lifecycle.clock import utcnow
from lifecycle.hes.files import FileHes
from lifecycle.installation import steps as installation

app = typer.Typer(no_args_is_help=True, help="Key orders exchanged with a HES as files.")
ACTION = "meter.claim"


@app.command("export")
@reports_errors
def export(file: Path = typer.Argument(..., help="JSON lines file to write (mode 0600)")) -> None:
    """Write the pending key orders for a real HES."""
    actor = authorize(ACTION, {"orders": "export", "file": str(file.resolve())})
    orders = steps.export_orders(engine(), actor, utcnow())
    FileHes.export(orders, file)
    console.print(f"{len(orders)} orders written to {file}")


@app.command("confirm")
@reports_errors
def confirm(file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                        help="the HES's outcomes (JSON lines)"),
            ) -> None:
    """Settle a HES's outcomes: each proof checked in the HSM before any key changes."""
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    actor = authorize(ACTION, {"orders": "confirm", "file": str(file.resolve()),
                               "sha256": digest})
    s = settings()
    installation.check_keys(s, engine())
    outcomes = FileHes.confirm(file)
    with steps.claim_workers(s, 0) as workers:
        report = steps.settle(workers, engine(), s, actor, outcomes, utcnow())
    steps.finish(engine(), s, actor, report, utcnow())
    console.print(f"{len(outcomes)} outcomes: {len(report.claimed)} claimed, "
                  f"{len(report.failed)} failed, {len(report.waiting)} waiting")
    for serial, reason in {**report.failed, **report.waiting}.items():
        console.print(f"  {serial}: {reason}")
