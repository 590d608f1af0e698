"""meterkeys audit commands: verify the trail, list events, sign the head."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.table import Table

from cli.common import console, engine, fail, principal_name, settings
from lifecycle import audit
from lifecycle.audit import Actor
from lifecycle.errors import AuditError, MeterkeysError
from lifecycle.inventory import transaction, utcnow
from lifecycle.role import authorize

app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail.")

EXIT_BROKEN = 2


def _public_key(path: Path | None) -> str:
    if path is not None:
        return path.read_text(encoding="ascii")
    from lifecycle.hsm import Hsm  # only when the token is needed

    with Hsm.open(settings()).session() as hs:
        return hs.public_key_pem(settings().audit_key_label).decode("ascii")


@app.command()
def verify(
    public_key: Path | None = typer.Option(
        None, "--public-key", exists=True, dir_okay=False,
        help="PEM of the audit public key (default: read it from the token)"),
) -> None:
    """Verify every event, the head and every signed checkpoint (exit 2 when broken)."""
    try:
        actor = authorize(engine(), principal_name(), "audit.verify", at=utcnow())
        pem = _public_key(public_key)
    except MeterkeysError as exc:
        raise fail(exc) from None
    try:
        with audit.snapshot(engine()) as session:
            count = audit.verify(session, pem)
    except AuditError as exc:
        _note(actor, "failed", {"seq": exc.seq, "reason": exc.reason})
        raise fail(exc, EXIT_BROKEN) from None
    _note(actor, "ok", {"events": count})
    console.print(f"audit trail intact: {count} events verified")


def _note(actor: Actor, outcome: str, detail: dict[str, object]) -> None:
    # The verification itself is audited; a trail too broken to append to must not hide
    # the verdict, so that failure is left to the verdict's own exit.
    with contextlib.suppress(AuditError), transaction(engine()) as session:
        audit.record(session, actor, "audit.verify", outcome, detail=detail, at=utcnow())


@app.command("list")
def list_events(
    limit: int = typer.Option(50, "--limit", min=1, help="newest N events"),
    meter: str | None = typer.Option(None, "--meter", help="only this meter serial"),
    action: str | None = typer.Option(None, "--action", help="only this action"),
) -> None:
    """List the newest audit events."""
    try:
        authorize(engine(), principal_name(), "audit.read", at=utcnow())
        with transaction(engine()) as session:
            rows = audit.events(session, limit=limit, meter_serial=meter, action=action)
    except MeterkeysError as exc:
        raise fail(exc) from None
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
def checkpoint_now() -> None:
    """Sign the current head with the HSM audit key now."""
    try:
        actor = authorize(engine(), principal_name(), "audit.checkpoint", at=utcnow())
        from lifecycle.hsm import Hsm

        with Hsm.open(settings()).session() as hs, transaction(engine()) as session:
            audit.record(session, actor, "audit.checkpoint", "ok", at=utcnow())
            made = audit.checkpoint(session, hs, settings().audit_key_label, utcnow())
    except MeterkeysError as exc:
        raise fail(exc) from None
    if made is None:
        console.print("nothing to sign: the trail is empty")
        return
    console.print(f"checkpoint {made.id}: seq {made.seq}, head {made.head_hash[:16]}…")
