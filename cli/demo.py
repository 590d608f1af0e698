"""meterkeys demo: the lifecycle built so far on a generated fleet, SQLite and SoftHSM2.

The demo plays every principal of a small DSO: two security officers (alice, the first, and
bob), an operator (olga), an auditor (aaron) and the system principal of the scheduled runs. It
makes their keys in its own home, and it refuses a home it did not create: its principals and
their keys must never mix with a real installation's.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.table import Table

from cli import dual
from cli.claim import run_claim
from cli.common import authorize, console, engine, settings, sign
from cli.importing import import_params, run_import
from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings, ensure_private_dir
from lifecycle.errors import AccessDenied, ConfigError, InventoryError
from lifecycle.factory_import import steps as import_steps
from lifecycle.hsm.connection import close_all
from lifecycle.identity import keys, request, signers
from lifecycle.identity.request import SignedRequest
from lifecycle.identity.signers import FileSigner, Signer
from lifecycle.installation import steps as installation
from lifecycle.inventory import certificates, claims, meters, vendor_cas, vendors
from lifecycle.inventory.db import transaction
from lifecycle.meter_keys import custody
from lifecycle.pki import profiles
from simulator import scenario
from simulator.hes import SimulatedHes
from simulator.manufacturer import SECRETS_SUFFIX
from tasks import context
from tasks.approval import SYSTEM_KEY_FILE

MARKER = "demo-home"
# The few meters that misbehave in the claim's first pass (one each), then behave.
MISBEHAVE = ("fail", "silent", "lie_nak", "lie_ok", "partial:3")
# What a home holds once anything has run in it (Prefect's own folder is made by every command).
STATE = ("inventory.db", "tokens", "secrets", "witness", "softhsm2.conf")


@dataclass(frozen=True)
class Cast:
    """The demo's principals: name -> (role, key)."""

    keys: dict[str, tuple[str, Signer]]

    def key(self, name: str) -> Signer:
        return self.keys[name][1]


PEOPLE = (("alice", principals.SECURITY_OFFICER, "p256"),
          ("bob", principals.SECURITY_OFFICER, "p256"),
          ("olga", principals.OPERATOR, "p256"),
          ("aaron", principals.AUDITOR, "ed25519"))


def demo(workers: int | None = typer.Option(None, help="HSM worker processes")) -> None:
    """Set up the HSM and the principals, onboard three vendors, import their batches, show
    a refused and a replayed request, run the PKI ceremony, claim the fleet through the
    simulated HES, verify and back up."""
    s = settings()
    try:
        claim_home(s)
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    cast = _cast(s)
    _hsm_setup(s, cast)
    _enrol_everyone(s, cast)
    sim = ensure_private_dir(s.simulation_dir, "simulation home")
    batches = [(vendor.name, path) for vendor, path in _batches(s, sim, cast)]
    olga = cast.key("olga")
    results = [(vendor, path, run_import(path, vendor, None, workers, olga))
               for vendor, path in batches]
    _print_results(results)
    _refusals(s, cast, batches[0][1], batches[0][0])
    _pki(cast, sim)
    _claim(s, cast, sim, workers)
    _audit_and_backup(s, cast)


def claim_home(s: Settings) -> None:
    """Mark a fresh home as the demo's; refuse a home that holds state the demo did not make.

    Raises:
        ConfigError: the home was not created by the demo, or is not the embedded default.
    """
    home = s.home_dir
    if s.database_url is not None or not s.is_softhsm:
        raise ConfigError("the demo runs on the embedded default only (SQLite and SoftHSM2): "
                          "unset METERKEYS_DATABASE_URL and METERKEYS_PKCS11_MODULE")
    if (home / MARKER).is_file():
        return
    found = sorted(name for name in STATE if (home / name).exists())
    if found:
        raise ConfigError(f"{home} was not created by meterkeys demo (it holds "
                          f"{', '.join(found)}): the demo enrols its own principals and keys "
                          "and never runs in a real installation's home; point METERKEYS_HOME "
                          "at a new folder")
    home.mkdir(parents=True, exist_ok=True)
    (home / MARKER).write_text("created by meterkeys demo\n", encoding="utf-8")


def _cast(s: Settings) -> Cast:
    """The demo principals' keys: made on the first run, encrypted under a demo passphrase that
    lives with the PINs (the demo plays every principal; a real one keeps its own key)."""
    folder = ensure_private_dir(s.home_dir / "principals", "demo principals' keys")
    secret_file = ensure_private_dir(s.secrets_dir, "secrets") / "demo-principals.passphrase"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(24), encoding="ascii")
    passphrase = secret_file.read_text(encoding="ascii").strip().encode()
    out: dict[str, tuple[str, Signer]] = {}
    for name, role, kind in PEOPLE:
        path = folder / f"{name}.key.pem"
        if not path.exists():
            signers.generate(folder, name, kind, passphrase)  # type: ignore[arg-type]
        out[name] = (role, FileSigner.load(path, passphrase))
    system = s.secrets_dir / SYSTEM_KEY_FILE
    if not system.exists():
        signers.generate(s.secrets_dir, SYSTEM_KEY_FILE.removesuffix(".key.pem"), "p256", None)
    out["system"] = (principals.SYSTEM, FileSigner.load(system, None))
    return Cast(out)


def _hsm_setup(s: Settings, cast: Cast) -> None:
    with transaction(engine()) as session:
        enrolled = bool(principals.list_principals(session))
    alice = cast.key("alice")
    if enrolled:
        actor = authorize("hsm.init", key=alice)
    else:
        pem = keys.normalize_pem(alice.public_key_pem(), "alice")
        params = {"name": "alice", "role": principals.SECURITY_OFFICER, "public_pem": pem}
        at = utcnow()
        signed = request.make("principal.enrol", params, "alice",
                              principals.installation_id(engine()), at, alice)
        principals.enrol_root(engine(), s, signed, pem, at=at)
        console.print("principal alice enrolled as the first security officer")
        actor = Actor("alice", principals.SECURITY_OFFICER)
    report = installation.init(s, engine(), make_pin_files=True, actor=actor)
    console.print("HSM: " + ", ".join(f"{item} {state}" for item, state in report.items.items()))


def _enrol_everyone(s: Settings, cast: Cast) -> None:
    with transaction(engine()) as session:
        known = {p.name for p in principals.list_principals(session)}
    for name, (role, key) in cast.keys.items():
        if name in known:
            continue
        params = {"name": name, "role": role,
                  "public_pem": keys.normalize_pem(key.public_key_pem(), name)}
        # bob, the second officer, is enrolled by alice alone (once, recorded in the trust
        # anchor); every later enrolment carries both officers' signatures.
        officers = ["alice"] if name == "bob" else ["alice", "bob"]
        dual.perform_signed([sign("principal.enrol", params, cast.key(o)) for o in officers],
                            "principal.enrol", params)
        console.print(f"principal {name} enrolled as {role} (signed by {' and '.join(officers)})")


def _officers(cast: Cast, action: str, params: dict[str, object]) -> str:
    return dual.perform_signed([sign(action, params, cast.key(o)) for o in ("alice", "bob")],
                               action, params)


def _batches(s: Settings, sim: Path, cast: Cast) -> list[tuple[scenario.DemoVendor, Path]]:
    out: list[tuple[scenario.DemoVendor, Path]] = []
    root, outbox = sim / "manufacturers", sim / "batches"
    for vendor in scenario.VENDORS:
        maker = scenario.manufacturer(root, vendor)
        _onboard(cast, vendor, maker.signing_public_pem())
        pem, oaep = _import_key(s, cast, vendor.name, sim)
        out.append((vendor, scenario.vendor_batch(maker, vendor, outbox / vendor.name,
                                                  pem.decode(), oaep)))
    maker = scenario.manufacturer(root, scenario.FLAWED)
    pem, oaep = _import_key(s, cast, scenario.FLAWED.name, sim)
    out.append((scenario.FLAWED, scenario.flawed_batch(
        maker, outbox / f"{scenario.FLAWED.name}-flawed", pem.decode(), oaep)))
    return out


def _onboard(cast: Cast, vendor: scenario.DemoVendor, signing_pem: str) -> None:
    with transaction(engine()) as session:
        try:
            vendors.get_vendor(session, vendor.name)
            return
        except InventoryError:
            pass
    _officers(cast, "vendor.add", {"name": vendor.name, "signing_pem": signing_pem,
                                   "mapping_toml": vendor.mapping.read_text(encoding="utf-8"),
                                   "source": str(vendor.mapping)})


def _import_key(s: Settings, cast: Cast, vendor: str, sim: Path) -> tuple[bytes, str]:
    with transaction(engine()) as session:
        record = vendors.get_vendor(session, vendor)
    out = sim / "manufacturers" / vendor / "dso-import-key.pub.pem"
    if record.import_key_label is None or not out.exists():
        _officers(cast, "vendor.import-key", {"name": vendor, "out": str(out)})
        with transaction(engine()) as session:
            record = vendors.get_vendor(session, vendor)
    return out.read_bytes(), str(record.oaep_hash)


def _print_results(results: list[tuple[str, Path, dict[str, object]]]) -> None:
    table = Table("vendor", "file", "records", "imported", "quarantined", "suites 0/1/2",
                  title="Factory import (signed by olga, operator)")
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


def _refusals(s: Settings, cast: Cast, path: Path, vendor: str) -> None:
    """Show requests the system refuses, each audited: a role, a replay, parameters that differ
    from what was signed, one officer where two are needed."""
    olga, aaron, alice = cast.key("olga"), cast.key("aaron"), cast.key("alice")
    checkpoint = sign("audit.checkpoint", {}, olga)
    actor = principals.authorize(engine(), s, [checkpoint], "audit.checkpoint", {}, at=utcnow())
    installation.sign_checkpoint(s, engine(), actor, utcnow())
    params = import_params(path, vendor, None, 0)
    backup: dict[str, object] = {"dest": str(s.home_dir / "backups")}
    attempts: list[tuple[str, str, list[SignedRequest], str, dict[str, object]]] = [
        ("aaron (auditor)", "import a batch", [sign("batch.import", params, aaron)],
         "batch.import", params),
        ("olga (operator)", "her checkpoint request once more", [checkpoint],
         "audit.checkpoint", {}),
        ("olga (operator)", "an import of another vendor than she signed",
         [sign("batch.import", params, olga)], "batch.import", {**params, "vendor": "cygnus"}),
        ("alice alone", "a token backup", [sign("hsm.backup", backup, alice)], "hsm.backup",
         backup),
    ]
    table = Table("who", "asked", "outcome", title="Refused requests (each audited)")
    for who, what, requests, action, values in attempts:
        try:
            principals.authorize(engine(), s, requests, action, values, at=utcnow())
            outcome = "[red]accepted[/]"
        except AccessDenied as exc:
            outcome = f"refused: {exc}"
        table.add_row(who, what, outcome)
    console.print(table)


def _audit_and_backup(s: Settings, cast: Cast) -> None:
    report = custody.verify_all(s, engine(), authorize("inventory.verify",
                                                       key=cast.key("aaron")), utcnow())
    console.print(f"key blobs: {report.checked} verified in the HSM, each bound to its meter, "
                  f"key id, version and KEK ({len(report.bad)} fail)")
    installation.sign_checkpoint(s, engine(), authorize("audit.checkpoint",
                                                        key=cast.key("olga")), utcnow())
    authorize("audit.verify", key=cast.key("aaron"))
    count = installation.verify_trail(s, engine())
    problems = principals.verify_all(engine(), s)
    console.print(f"audit trail: {count} events, hash chain, signed checkpoints and witness "
                  "intact")
    console.print("principals: every enrolment verifies back to the trust anchor"
                  if not problems else f"[red]principals that do not verify:[/] {problems}")
    close_all()
    console.print(_officers(cast, "hsm.backup", {"dest": str(s.home_dir / "backups")}))
    console.print("Prefect UI: run `make serve` and open http://127.0.0.1:4200 "
                  "(the demo's runs are in its history)")


def _pki(cast: Cast, sim: Path) -> None:
    """The PKI ceremony (alice and bob), once; then each demo vendor's factory CAs, registered
    under the same dual control (the claim verifies suite 1/2 factory certificates)."""
    with transaction(engine()) as session:
        done = certificates.current_ca(session, profiles.DEVICE_P256) is not None
    if not done:
        console.print(_officers(cast, "pki.ceremony", {"renew": []}))
    root = sim / "manufacturers"
    for vendor in scenario.VENDORS:
        maker = scenario.manufacturer(root, vendor)
        with transaction(engine()) as session:
            record = vendors.get_vendor(session, vendor.name)
            known = {r.fingerprint for r in vendor_cas.vendor_cas(session, int(record.id or 0))}
        for suite in (1, 2):
            pem = maker.factory_ca_pem(suite)
            der = _der(pem)
            if hashlib.sha256(der).hexdigest() not in known:
                console.print(_officers(cast, "vendor.add-ca", {"name": vendor.name,
                                                                "certificate_pem": pem}))


def _der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def _claim(s: Settings, cast: Cast, sim: Path, workers: int | None) -> None:
    """Claim every registered meter through the simulated HES (olga signs), a few of them
    misbehaving; then a second pass with them behaving, and how each of the few ended."""
    folder = sim / "hes"
    os.environ["METERKEYS_HES"] = f"simulated:{folder}"
    context.reset()
    with transaction(engine()) as session:
        waiting = [m.serial for m in meters.list_meters(session, limit=100_000)
                   if m.state in ("registered", "claimed")]
    if not waiting:
        console.print("ownership claim: every meter is operational already (nothing to claim)")
        return
    few = dict(zip(waiting[:len(MISBEHAVE)], MISBEHAVE, strict=False))
    SimulatedHes.open(folder, sorted(sim.rglob(f"*{SECRETS_SUFFIX}")), modes=few,
                      engine="cryptography")
    olga = cast.key("olga")
    started = time.perf_counter()
    first = [run_claim(_claim_params(vendor=v.name, workers=workers), olga)
             for v in scenario.VENDORS]
    seconds = time.perf_counter() - started
    totals = {k: sum(len(r[k]) for r in first) for k in ("claimed", "recovered", "failed",
                                                         "waiting", "certified")}
    console.print(f"ownership claim (signed by olga) in {seconds:.1f} s: "
                  + ", ".join(f"{n} {k}" for k, n in totals.items())
                  + "; each claimed meter proved the DSO's keys, checked in the HSM")
    hes = SimulatedHes.load(folder)
    for serial in few:
        hes.set_mode(serial, "ok")
    second = run_claim(_claim_params(serials=list(few), workers=workers), olga)
    _print_claim(few, first, second)


def _claim_params(*, vendor: str | None = None, serials: list[str] | None = None,
                  workers: int | None) -> dict[str, Any]:
    return {"batch_id": None, "vendor": vendor, "serials": serials, "wait_seconds": 0.0,
            "workers": workers}


def _ended(serial: str, results: list[dict[str, Any]]) -> str:
    """How one meter ended in a pass (its runs' results)."""
    for result in results:
        for kind in ("claimed", "recovered"):
            if serial in result[kind]:
                return kind + (" + certificates" if serial in result["certified"] else "")
    for result in results:
        for kind in ("failed", "waiting"):
            if serial in result[kind]:
                return f"{kind}: {result[kind][serial]}"
    return "nothing to do: operational already"


def _print_claim(few: dict[str, str], first: list[dict[str, Any]],
                 second: dict[str, Any]) -> None:
    table = Table("meter", "mode", "first pass", "second pass (behaving)",
                  title="Ownership claim: the meters that misbehaved")
    for serial, mode in few.items():
        table.add_row(serial, mode, _ended(serial, first), _ended(serial, [second]))
    console.print(table)
    with transaction(engine()) as session:
        states = claims.count_by_state(session, [int(m.id or 0) for m in
                                                 meters.list_meters(session, limit=100_000)])
    console.print("meters by state: " + ", ".join(f"{n} {k}" for k, n in sorted(states.items())))
