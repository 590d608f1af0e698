"""meterkeys demo: the lifecycle built so far on a generated fleet, SQLite and SoftHSM2."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import authorize, console, engine, principal_name, settings
from cli.importing import run_import
from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings, ensure_private_dir
from lifecycle.errors import InventoryError
from lifecycle.factory_import import steps as import_steps
from lifecycle.factory_import import vendor as vendor_steps
from lifecycle.hsm.connection import close_all
from lifecycle.installation import steps as installation
from lifecycle.inventory import meters, vendors
from lifecycle.inventory.db import transaction
from lifecycle.meter_keys import custody
from simulator import scenario


def demo(workers: int | None = typer.Option(None, help="HSM worker processes")) -> None:
    """Set up the HSM, onboard three vendors, import their batches and show the result."""
    s = settings()
    _hsm_setup(s)
    _bootstrap_principal(principal_name())
    # The manufacturers' keys and the meters' secrets are other parties' secrets: they live in
    # the simulation directory, beside METERKEYS_HOME and never inside it.
    sim = ensure_private_dir(s.simulation_dir, "simulation home")
    batches = [(vendor.name, path) for vendor, path in _batches(s, sim)]
    results = [(vendor, path, run_import(path, vendor, None, workers))
               for vendor, path in batches]
    _print_results(results)
    _audit_and_backup(s)


def _hsm_setup(s: Settings) -> None:
    with transaction(engine()) as session:
        enrolled = bool(principals.list_principals(session))
    # Before anyone is enrolled the init is the bootstrap (as ``meterkeys hsm init``).
    actor = authorize("hsm.init") if enrolled else Actor(principal_name(), None)
    report = installation.init(s, engine(), make_pin_files=True, actor=actor)
    console.print("HSM: " + ", ".join(f"{item} {state}" for item, state in report.items.items()))


def _bootstrap_principal(me: str) -> None:
    with transaction(engine()) as session:
        if principals.role_of(session, me) is None:
            principals.add_principal(session, me, principals.SECURITY_OFFICER)
            console.print(f"principal {me!r} enrolled as security-officer")


def _batches(s: Settings, sim: Path) -> list[tuple[scenario.DemoVendor, Path]]:
    out: list[tuple[scenario.DemoVendor, Path]] = []
    root, outbox = sim / "manufacturers", sim / "batches"
    for vendor in scenario.VENDORS:
        maker = scenario.manufacturer(root, vendor)
        _onboard(vendor, maker.signing_public_pem())
        pem, oaep = _import_key(s, vendor.name)
        out.append((vendor, scenario.vendor_batch(maker, vendor, outbox / vendor.name,
                                                  pem.decode(), oaep)))
    maker = scenario.manufacturer(root, scenario.FLAWED)
    pem, oaep = _import_key(s, scenario.FLAWED.name)
    out.append((scenario.FLAWED, scenario.flawed_batch(
        maker, outbox / f"{scenario.FLAWED.name}-flawed", pem.decode(), oaep)))
    return out


def _onboard(vendor: scenario.DemoVendor, signing_pem: str) -> None:
    with transaction(engine()) as session:
        try:
            vendors.get_vendor(session, vendor.name)
            return
        except InventoryError:
            pass
    vendor_steps.add_vendor(engine(), authorize("vendor.add"), vendor.name, signing_pem,
                            vendor.mapping.read_text(encoding="utf-8"),
                            source=str(vendor.mapping), at=utcnow())


def _import_key(s: Settings, vendor: str) -> tuple[bytes, str]:
    return vendor_steps.issue_import_key(engine(), s, authorize("vendor.import-key"), vendor,
                                         at=utcnow())


def _print_results(results: list[tuple[str, Path, dict[str, object]]]) -> None:
    table = Table("vendor", "file", "records", "imported", "quarantined", "suites 0/1/2",
                  title="Factory import")
    rejected = []
    for vendor, path, summary in results:
        by_suite = summary.get("by_suite") or {}
        assert isinstance(by_suite, dict)
        table.add_row(vendor, path.name, str(summary["records"]), str(summary["imported"]),
                      str(summary["quarantined"]),
                      "/".join(str(by_suite.get(n, by_suite.get(str(n), 0))) for n in (0, 1, 2)))
        batch_id = int(str(summary["batch_id"]))
        rejected += [(path.name, r) for r in import_steps.quarantine_report(engine(), batch_id)]
    console.print(table)
    if rejected:
        bad = Table("file", "row", "field", "serial", "reason", title="Quarantined rows")
        for name, r in rejected:
            bad.add_row(name, str(r["row"]), r["field"], r["serial"], r["reason"])
        console.print(bad)
    with transaction(engine()) as session:
        total = meters.count_meters(session)
    console.print(f"inventory: {total} meters, 4 key blobs each, wrapped under the storage KEKs")


def _audit_and_backup(s: Settings) -> None:
    me = principal_name()
    report = custody.verify_all(s, engine(), principals.authorize(
        engine(), me, "inventory.verify", at=utcnow()), utcnow())
    console.print(f"key blobs: {report.checked} verified in the HSM, each bound to its meter, "
                  f"key id, version and KEK ({len(report.bad)} fail)")
    installation.sign_checkpoint(s, engine(), principals.authorize(
        engine(), principal_name(), "audit.checkpoint", at=utcnow()), utcnow())
    count = installation.verify_trail(s, engine())
    console.print(f"audit trail: {count} events, hash chain and signed checkpoints intact")
    close_all()
    made = installation.backup(s, engine(), authorize("hsm.backup"), s.home_dir / "backups")
    console.print(f"token backup: {made.path} (generation {made.generation}, signed)")
    console.print("Prefect UI: run `make serve` and open http://127.0.0.1:4200 "
                  "(the demo's runs are in its history)")
