"""meterkeys audit commands: verify the trail, list events, sign the head."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import authorize, console, engine, err_console, fail, reports_errors, settings
from lifecycle import principals
from lifecycle.audit import trail
from lifecycle.claim import steps as claim_steps
from lifecycle.clock import utcnow
from lifecycle.errors import AuditError
from lifecycle.installation import steps
from lifecycle.inventory.db import transaction
from lifecycle.pki import steps as pki_steps

app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail.")

EXIT_BROKEN = 2


@app.command()
@reports_errors
def verify(
    public_key: Path | None = typer.Option(
        None, "--public-key", exists=True, dir_okay=False,
        help="PEM of the audit public key (default: read it from the token); it must be the "
             "key pinned by hsm init"),
) -> None:
    """Verify every event, the head and every signed checkpoint against the pinned audit key
    and the witness, every principal against the anchor and the trail, every factory CA row
    against its registration, and every stored invocation counter against the trail (exit 2
    when broken)."""
    actor = authorize("audit.verify")
    pem = public_key.read_text(encoding="ascii") if public_key is not None else None
    try:
        count = steps.verify_trail(settings(), engine(), pem)
    except AuditError as exc:
        steps.note_verification(engine(), actor, "failed", {"seq": exc.seq, "reason": exc.reason},
                                utcnow())
        raise fail(exc, EXIT_BROKEN) from None
    problems = principals.verify_all(engine(), settings())
    problems += pki_steps.verify_vendor_cas(engine(), settings())
    problems += claim_steps.verify_counters(engine())
    if problems:
        steps.note_verification(engine(), actor, "failed", {"events": count,
                                                             "problems": problems[:20]},
                                utcnow())
        for problem in problems:
            err_console.print(f"[bold red]error:[/] {problem}", soft_wrap=True)
        raise typer.Exit(EXIT_BROKEN)
    steps.note_verification(engine(), actor, "ok", {"events": count}, utcnow())
    console.print(f"audit trail intact: {count} events verified against the pinned audit key "
                  f"and the witness in {settings().witness_path}; every principal's enrolment "
                  "verifies back to the trust anchor and agrees with the trail, and so do "
                  "every registered factory CA and every stored invocation counter")


@app.command("list")
@reports_errors
def list_events(
    limit: int = typer.Option(50, "--limit", min=1, help="newest N events"),
    meter: str | None = typer.Option(None, "--meter", help="only this meter serial"),
    action: str | None = typer.Option(None, "--action", help="only this action"),
) -> None:
    """List the newest audit events."""
    with transaction(engine()) as session:
        rows = trail.events(session, limit=limit, meter_serial=meter, action=action)
    table = Table(title=f"audit events (newest {limit})")
    for name in ("seq", "at (UTC)", "principal", "role", "action", "outcome", "meter", "batch",
                 "flow run", "detail"):
        table.add_column(name, overflow="fold")
    for e in rows:
        table.add_row(str(e.seq), e.at.strftime("%Y-%m-%d %H:%M:%S"), e.principal, e.role or "-",
                      e.action, e.outcome, e.meter_serial or "-",
                      "-" if e.batch_id is None else str(e.batch_id), e.flow_run_id or "-",
                      e.detail)
    console.print(table)


@app.command("checkpoint")
@reports_errors
def checkpoint_now() -> None:
    """Sign the current head with the HSM audit key now and hand it to the witness."""
    actor = authorize("audit.checkpoint")
    made = steps.sign_checkpoint(settings(), engine(), actor, utcnow())
    if made is None:
        console.print("nothing to sign: the trail is empty")
        return
    console.print(f"checkpoint {made.id}: seq {made.seq}, head {made.head_hash[:16]}…")
