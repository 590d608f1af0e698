"""meterkeys vendor commands: onboard a manufacturer and give it the DSO's import key."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli import dual
from cli.common import console, engine, reports_errors
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
    """Onboard a vendor: its manifest signing key and its file mapping (dual control).

    Leaves a request that a second security officer approves with `meterkeys approve`.
    """
    dual.request("vendor.add", {"name": name,
                                "signing_pem": signing_key.read_text(encoding="utf-8"),
                                "mapping_toml": mapping.read_text(encoding="utf-8"),
                                "source": str(mapping)})


@app.command("import-key")
@reports_errors
def import_key(name: str = typer.Argument(..., help="vendor name"),
               out: Path = typer.Option(..., help="where to write the public key PEM for the "
                                                  "manufacturer")) -> None:
    """Generate (once) the vendor's RSA import key pair in the HSM and export its public key
    (dual control: performed when a second security officer approves)."""
    dual.request("vendor.import-key", {"name": name, "out": str(out.resolve())})


@app.command("add-ca")
@reports_errors
def add_ca(name: str = typer.Argument(..., help="vendor name"),
           certificate: Path = typer.Option(..., exists=True, dir_okay=False,
                                            help="the vendor's factory CA certificate (PEM)")
           ) -> None:
    """Register a factory CA certificate of a vendor, which its meters' factory certificates
    must chain to (dual control: performed when a second security officer approves)."""
    dual.request("vendor.add-ca", {"name": name,
                                   "certificate_pem": certificate.read_text(encoding="ascii")})


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
