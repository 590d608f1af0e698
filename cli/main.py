"""The ``meterkeys`` command: every command group and command is registered here."""

from __future__ import annotations

import typer

from cli import (
    approving,
    audit,
    claim,
    demo,
    hsm,
    importing,
    inventory,
    meters,
    orders,
    pki,
    principal,
    serve,
    vendor,
)

app = typer.Typer(help="meterkeys: key lifecycle management for smart-meter fleets",
                  no_args_is_help=True)
app.add_typer(hsm.app, name="hsm")
app.add_typer(vendor.app, name="vendor")
app.add_typer(meters.app, name="meters")
app.add_typer(audit.app, name="audit")
app.add_typer(inventory.app, name="inventory")
app.add_typer(principal.app, name="principal")
app.add_typer(orders.app, name="orders")
app.add_typer(pki.app, name="pki")
app.command("import")(importing.import_file)
app.command("claim")(claim.claim)
app.command("approve")(approving.approve)
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)

if __name__ == "__main__":
    app()
