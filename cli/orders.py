"""meterkeys orders: the claim's work for a real HES through files (JSON lines), and its answers.

``export`` writes one file: every key order still waiting for an outcome (wrapped keys and
challenges only; never a key in clear), the meters asked for certificate requests, and the
certificate orders not yet delivered. ``confirm`` reads the HES's answer file: key-order
outcomes, settled as the flow does (only a proof checked in the HSM changes a key), certificate
requests (checked, certified in the HSM) and certificate imports (orders marked delivered). A
bad line is named and refused, the good ones are still taken. Both are signed (action
meter.claim, the answer file's digest in the request) and audited. docs/hes-files.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer

from cli.common import authorize, console, engine, err_console, reports_errors, settings
from lifecycle.claim import certification, steps
from lifecycle.clock import utcnow
from lifecycle.hes.files import FileHes, read_bytes
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.installation import steps as installation

app = typer.Typer(no_args_is_help=True, help="The claim's work exchanged with a HES as files.")
ACTION = "meter.claim"


@app.command("export")
@reports_errors
def export(file: Path = typer.Argument(..., help="JSON lines file to write (mode 0600)")) -> None:
    """Write the pending key orders and certificate work for a real HES."""
    actor = authorize(ACTION, {"orders": "export", "file": str(file.resolve())})
    now = utcnow()
    orders = steps.export_orders(engine(), actor, now)
    asks, certificates = certification.export_work(engine(), actor, now)
    FileHes.export_work(file, orders, asks, certificates)
    console.print(f"{len(orders)} key orders, {len(asks)} certificate-request asks and "
                  f"{len(certificates)} certificate orders written to {file}")


@app.command("confirm")
@reports_errors
def confirm(file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                        help="the HES's answers (JSON lines)"),
            ) -> None:
    """Settle a HES's answers: each proof checked in the HSM before any key changes."""
    data = read_bytes(file)  # read once: what is settled is what the request signs
    digest = hashlib.sha256(data).hexdigest()[:16]
    actor = authorize(ACTION, {"orders": "confirm", "file": str(file.resolve()),
                               "sha256": digest})
    answers = FileHes.read_answers(data, file)
    s = settings()
    installation.check_keys(s, engine())
    steps.record_rejected(engine(), actor, str(file), answers.rejected, utcnow())
    report = steps.Report()
    with HsmWorkers(s, 0) as workers:
        if answers.outcomes:
            report.merge(steps.settle(workers, engine(), s, actor, answers.outcomes, utcnow()))
        certified, issued = certification.certify_from_requests(
            workers, engine(), s, actor, answers.csrs, utcnow())
    report.merge(certified)
    report.merge(certification.confirm_imports(engine(), actor, answers.imports, utcnow()))
    steps.finish(engine(), s, actor, report, utcnow())
    console.print(f"{len(answers.outcomes)} outcomes: {len(report.claimed)} claimed, "
                  f"{len(report.failed)} failed, {len(report.waiting)} waiting; "
                  f"{len(issued)} certificate orders issued (run orders export), "
                  f"{len(report.certified)} delivered, {len(report.uncertified)} refused")
    for serial, reason in {**report.failed, **report.waiting, **report.uncertified}.items():
        console.print(f"  {serial}: {reason}")
    for error in answers.rejected:
        err_console.print(f"[bold red]rejected:[/] {error}", soft_wrap=True)
    if answers.rejected:
        raise typer.Exit(1)
