"""meterkeys vendor commands: onboard a manufacturer and give it the DSO's import key."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import console, engine, fail, principal_name, settings
from lifecycle import inventory, role
from lifecycle.errors import MeterkeysError
from lifecycle.importer import Mapping

app = typer.Typer(no_args_is_help=True, help="Manufacturers and their import keys.")


def import_key_label(vendor: str) -> str:
    return f"meterkeys-import-{vendor}"


@app.command("add")
def add(name: str = typer.Argument(..., help="vendor name, e.g. acme"),
        signing_key: Path = typer.Option(..., exists=True, dir_okay=False,
                                         help="manufacturer's ECDSA public key (PEM) that "
                                              "signs batch manifests"),
        mapping: Path = typer.Option(..., exists=True, dir_okay=False,
                                     help="TOML mapping of the vendor's file onto the "
                                          "canonical batch fields")) -> None:
    """Onboard a vendor: its manifest signing key and its file mapping."""
    try:
        role.authorize(engine(), principal_name(), "vendor.add", at=inventory.utcnow())
        text = mapping.read_text(encoding="utf-8")
        Mapping.parse(text, str(mapping))
        with inventory.transaction(engine()) as session:
            inventory.add_vendor(session, name, signing_key.read_text(encoding="utf-8"), text)
    except MeterkeysError as exc:
        raise fail(exc) from None
    console.print(f"vendor [bold]{name}[/] added")


@app.command("import-key")
def import_key(name: str = typer.Argument(..., help="vendor name"),
               out: Path = typer.Option(..., help="where to write the public key PEM for the "
                                                  "manufacturer")) -> None:
    """Generate (once) the vendor's RSA import key pair in the HSM and export its public key."""
    from lifecycle import vendor as vendor_ops

    try:
        role.authorize(engine(), principal_name(), "vendor.import-key", at=inventory.utcnow())
        pem, oaep = vendor_ops.ensure_import_key(engine(), settings(), name,
                                                 import_key_label(name))
    except MeterkeysError as exc:
        raise fail(exc) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pem)
    console.print(f"import public key of [bold]{name}[/] written to {out}; the manufacturer "
                  f"wraps each batch transport key with RSA-OAEP-{oaep.upper()} under it")


@app.command("list")
def list_vendors() -> None:
    """List the onboarded vendors."""
    with inventory.transaction(engine()) as session:
        vendors = inventory.list_vendors(session)
    table = Table("vendor", "format", "import key", "OAEP hash", "since")
    for v in vendors:
        fmt = Mapping.parse(v.mapping, v.name).format if v.mapping else "-"
        table.add_row(v.name, fmt, v.import_key_label or "-", v.oaep_hash or "-",
                      f"{v.created_at:%Y-%m-%d}")
    console.print(table)
