"""meterkeys pki commands: the key ceremony, export, list, revoke, CRLs, check.

``ceremony`` is under dual control: the first security officer's command leaves a request,
the second performs it with ``meterkeys approve R-...`` (``cli.dual``); it is the one command
that opens the offline root's token and reads its PIN. Every other command here opens the main
token only (``crl``) or none at all (``export``, ``list``, ``check``).
"""

from __future__ import annotations

from pathlib import Path

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.table import Table

from cli import dual
from cli.common import authorize, console, engine, reports_errors, settings
from lifecycle.clock import utcnow
from lifecycle.errors import PkiError
from lifecycle.pki import profiles, rules, steps

app = typer.Typer(no_args_is_help=True, help="The DSO's PKI: ceremony, CA certificates, CRLs.")


@app.command("ceremony")
@reports_errors
def ceremony(renew: list[str] = typer.Option([], "--renew", help="renew this online CA now "
                                             "(new key and certificate); repeatable"),
             revoke: list[str] = typer.Option([], "--revoke", help="revoke a sub-CA generation "
                                              "<ca>:<generation> on the root's CRL (renewed at "
                                              "once if it is the newest); repeatable"),
             reason: str = typer.Option("key-compromise", "--reason",
                                        help=f"why, for --revoke: {', '.join(rules.CA_REASONS)}"),
             ) -> None:
    """Create the root CA when absent, revoke sub-CA generations, make or renew the online
    sub-CAs (dual control).

    Leaves a request that a second security officer performs with `meterkeys approve`. A
    renewal never revokes the older generation: its certificates stay valid until they expire.
    """
    for name in renew:
        profiles.profile(name)
    params: dict[str, object] = {"renew": sorted(set(renew))}
    if revoke:
        pairs = rules.parse_ca_revocations(revoke, reason)
        params.update(revoke=[f"{name}:{generation}" for name, generation in pairs],
                      reason=reason)
    dual.request("pki.ceremony", params)


@app.command("export")
@reports_errors
def export(directory: Path = typer.Argument(..., help="folder for the PEM files")) -> None:
    """Write every CA certificate and each CA's newest CRL as PEM (reads only)."""
    for path in steps.export(engine(), directory):
        console.print(str(path))


@app.command("list")
@reports_errors
def list_cas() -> None:
    """List the CA certificates."""
    table = Table("CA", "gen", "curve", "status", "serial", "subject", "not after")
    for r in steps.ca_list(engine()):
        table.add_row(r.ca_name, str(r.generation), r.curve, r.status, r.serial, r.subject,
                      f"{r.not_after:%Y-%m-%d}")
    console.print(table)


@app.command("revoke")
@reports_errors
def revoke(serial: str = typer.Argument(..., help="the certificate's serial: decimal, 0x-hex "
                                                  "or colon-separated hex"),
           reason: str = typer.Option(..., "--reason",
                                      help=f"one of {', '.join(profiles.REASONS)}")) -> None:
    """Revoke an issued certificate (security officer); it goes on its CA's next CRL."""
    number = profiles.parse_serial(serial)
    profiles.reason(reason)
    actor = authorize("pki.revoke", {"serial": str(number), "reason": reason})
    ca = steps.revoke(engine(), actor, number, reason, utcnow())
    console.print(f"certificate {number} revoked ({reason}); issue the next CRL: "
                  f"meterkeys pki crl {ca}")


@app.command("crl")
@reports_errors
def crl(ca: str = typer.Argument(..., help="an online CA: " + ", ".join(profiles.ONLINE))) -> None:
    """Issue the next CRL of an online CA (each of its unexpired generations)."""
    profiles.profile(ca)
    actor = authorize("pki.crl", {"ca": ca})
    for made in steps.issue_crl(settings(), engine(), actor, ca, utcnow()):
        console.print(f"CRL {made.number} of {made.ca_name} generation {made.generation}: "
                      f"{made.revoked} revoked, next update {made.next_update:%Y-%m-%d %H:%M}")
        if made.only_in_trail:
            console.print(f"[red]{made.only_in_trail} revocation(s) of the audit trail were "
                          "missing from the inventory: listed anyway (pki.crl.discrepancy)[/red]")


@app.command("check")
@reports_errors
def check(certificate: Path = typer.Argument(..., help="a certificate (PEM or DER) found in "
                                                       "the field")) -> None:
    """Tell whether a certificate is one this PKI issued: issued, revoked, ca, forged (signed
    by one of its CA keys but never issued here) or unknown; exit 1 unless issued or ca."""
    data = certificate.read_bytes()
    try:
        der = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----")
               else x509.load_der_x509_certificate(data)).public_bytes(
            serialization.Encoding.DER)
    except ValueError:
        raise PkiError(f"file {certificate}", "not an X.509 certificate (PEM or DER)") from None
    verdict = steps.check_certificate(engine(), der)
    console.print(f"{verdict.state}: {verdict.why}")
    if verdict.state not in ("issued", "ca"):
        raise typer.Exit(1)
