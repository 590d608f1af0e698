"""meterkeys vendor commands: onboard a manufacturer and give it the DSO's import key."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import authorize, console, engine, reports_errors, settings
from lifecycle.clock import utcnow
from lifecycle.factory_import import vendor as vendor_steps
from lifecycle.factory_import.reader import Mapping
from lifecycle.inventory import vendors
from lifecycle.inventory.db import transaction

app = typer.Typer(no_args_is_help=True, help="Manufacturers and their import keys.")


@app.command("add")
@reports_errors
def add(name: str = typer.Argument(..., help="vendor name, e.g. acme"),
        signing_key: Path = typer.Option(..., exists=True, dir_okay=False,
                                         help="manufacturer's ECDSA public key (PEM) that "
                                              "signs batch manifests"),
        mapping: Path = typer.Option(..., exists=True, dir_okay=False,
                                     help="TOML mapping of the vendor's file onto the "
                                          "canonical batch fields")) -> None:
    """Onboard a vendor: its manifest signing key and its file mapping."""
    actor = authorize("vendor.add")
    vendor_steps.add_vendor(engine(), actor, name, signing_key.read_text(encoding="utf-8"),
                            mapping.read_text(encoding="utf-8"), source=str(mapping),
                            at=utcnow())
    console.print(f"vendor [bold]{name}[/] added")


@app.command("import-key")
@reports_errors
def import_key(name: str = typer.Argument(..., help="vendor name"),
               out: Path = typer.Option(..., help="where to write the public key PEM for the "
                                                  "manufacturer")) -> None:
    """Generate (once) the vendor's RSA import key pair in the HSM and export its public key."""
    actor = authorize("vendor.import-key")
    pem, oaep = vendor_steps.issue_import_key(engine(), settings(), actor, name, at=utcnow())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pem)
    console.print(f"import public key of [bold]{name}[/] written to {out}; the manufacturer "
                  f"wraps each batch transport key with RSA-OAEP-{oaep.upper()} under it")


@app.command("list")
@reports_errors
def list_vendors() -> None:
    """List the onboarded vendors."""
    with transaction(engine()) as session:
        rows = vendors.list_vendors(session)
    table = Table("vendor", "format", "import key", "OAEP hash", "since")
    for v in rows:
        fmt = Mapping.parse(v.mapping, v.name).format if v.mapping else "-"
        table.add_row(v.name, fmt, v.import_key_label or "-", v.oaep_hash or "-",
                      f"{v.created_at:%Y-%m-%d}")
    console.print(table)
