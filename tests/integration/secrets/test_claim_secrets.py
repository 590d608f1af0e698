"""No plaintext key, PIN, passphrase or private key is stored anywhere the key ceremony, the
ownership claim and an approval leave data.

One scenario: twelve meters (suites 0, 1, 2, five of them misbehaving) imported, the PKI
ceremony performed under dual control, a claim run with a signed request, then a claim run
started as the Prefect UI starts one, paused, and approved by an operator whose key is
encrypted under a passphrase. The needles: every factory key, every key the DSO installed on
the meters, the meters' own certificate keys, the main and the root token's PINs, the
principals' private scalars and the approver's passphrase. The places: as
``test_no_secrets`` scans them (inventory, Prefect's database and files, Prefect's API, the
test's home, the captured output). A DSO key planted on purpose is then shown to be found.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.deployments import run_deployment
from prefect.flow_engine import run_flow

from cli import common
from cli.approve import approve_run
from deployments.serve import OWNERSHIP_CLAIM, deployments
from flows.ownership_claim import ownership_claim
from lifecycle import principals
from lifecycle.audit import trail
from lifecycle.clock import utcnow
from lifecycle.identity import signers
from lifecycle.inventory import db
from lifecycle.pki import ceremony, profiles
from lifecycle.policy import KeyId
from simulator.hes import SimulatedHes
from simulator.manufacturer import read_meter_secrets
from tasks import context
from tests import secret_scan
from tests.identities import KINDS, ROOT, SECOND
from tests.integration.claim.conftest import ClaimFleet, officers, register_factory_cas
from tests.integration.secrets.test_no_secrets import (
    _plant_artifact,
    _plant_inventory,
    _plant_log,
    assert_no_secret_text,
    needle_names,
    prefect_home,
    scan_everything,
    wait_for_flow_run_events,
)

# SQLite only: the PostgreSQL side of the scan (pg_dump of the schema) is proven by
# test_no_secrets, and the module must stay within its time budget.
pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.prefect_heartbeats,
              pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

MODES = ("fail", "silent", "lie_ok", "lie_nak", "partial:2")
APPROVER = "h1-approver"
WAIT = 60.0


# --- the scenario -------------------------------------------------------------------------------
def _claim_fleet(fleet, out: Path, count: int, suites: tuple[int, ...],  # type: ignore[no-untyped-def]
                 monkeypatch: pytest.MonkeyPatch) -> ClaimFleet:
    """An imported acme batch over a simulated HES (as the claim tests' ``claim_fleet``)."""
    files = fleet.batch("acme", out / "batch", count, suites=suites)
    state = fleet.run(files, "acme")
    assert state.is_completed(), state.message
    register_factory_cas(fleet, "acme")
    hes_dir = out / "hes"
    SimulatedHes.open(hes_dir, [files.secrets], engine="cryptography")
    monkeypatch.setenv("METERKEYS_HES", f"simulated:{hes_dir}")
    context.reset()
    return ClaimFleet(fleet, files, hes_dir)


def _enrol_approver(fleet, where: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # type: ignore[no-untyped-def]
    """Enrol an operator whose key is encrypted under a passphrase read from a file, and make
    the command line sign with it; return the passphrase file."""
    where.mkdir()
    passphrase = where / "passphrase"
    passphrase.write_text(f"h1 {secrets.token_urlsafe(18)} horse\n", encoding="utf-8")
    passphrase.chmod(0o600)
    key_path, pub_path = signers.generate(where, APPROVER, "p256",
                                          passphrase.read_text(encoding="utf-8").strip().encode())
    pem = pub_path.read_text(encoding="ascii")
    params = principals.enrolment_params(APPROVER, principals.OPERATOR, pem)
    principals.enrol(fleet.engine, fleet.settings,
                     [fleet.ids.sign(who, principals.ENROL, params) for who in (ROOT, SECOND)],
                     APPROVER, principals.OPERATOR, pem, at=utcnow())
    monkeypatch.setenv("METERKEYS_PRINCIPAL_KEY", str(key_path))
    monkeypatch.setenv("METERKEYS_PRINCIPAL_KEY_PASSPHRASE_FILE", str(passphrase))
    context.settings.cache_clear()
    common.signer.cache_clear()
    return passphrase


def _wait_paused(run_id: UUID) -> None:
    deadline = time.monotonic() + WAIT
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_paused():
                return
            assert time.monotonic() < deadline, f"the run stayed {state}"
            time.sleep(0.2)


def _approved_claim(params: dict[str, Any]) -> State:
    """Start a claim as the Prefect UI does (no request), execute it in a thread as the
    serving process would, approve it with ``meterkeys approve``; return its final state."""
    next(d for d in deployments() if d.name == OWNERSHIP_CLAIM).apply()
    run: FlowRun = run_deployment(f"ownership-claim/{OWNERSHIP_CLAIM}",  # type: ignore[assignment]
                                  parameters=params, timeout=0)
    done: list[State] = []

    def execute() -> None:
        done.append(run_flow(ownership_claim, flow_run=run,  # type: ignore[arg-type]
                             parameters=run.parameters, return_type="state"))

    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    _wait_paused(run.id)
    approve_run(str(run.id), yes=True)
    thread.join(WAIT)
    assert done, "the approved run did not finish in time"
    return done[0]


def _dso_keys(hes: SimulatedHes, factory: dict[str, dict[str, str]]) -> dict[str, bytes]:
    """The keys the meters hold now that are not their factory keys, by needle name."""
    return {f"dso:{serial}.{key_id.field}": key
            for serial, meter in hes.meters.items() for key_id, key in meter.keys.items()
            if key.hex() != factory[serial][key_id.field].lower()}


def _private_keys(fleet, approver_dir: Path, hes: SimulatedHes) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Named PEM private keys: the test principals', and the meters' certificate keys."""
    pems = {f"principal:{name}": fleet.ids.key_path(name).read_bytes() for name in KINDS}
    pems[f"principal:{APPROVER}"] = (approver_dir / f"{APPROVER}.key.pem").read_bytes()
    for serial, meter in hes.meters.items():
        for usage, pem in meter.ec_keys.items():
            pems[f"meter:{serial}.{usage}"] = pem.encode("ascii")
    return pems


def _capture_prefect_loggers(caplog: pytest.LogCaptureFixture,
                             request: pytest.FixtureRequest) -> None:
    caplog.set_level(logging.DEBUG)
    names = ("prefect", "prefect.extra", "prefect._internal")
    for name in names:  # Prefect's loggers do not propagate
        logging.getLogger(name).addHandler(caplog.handler)

    def detach() -> None:
        for name in names:
            logging.getLogger(name).removeHandler(caplog.handler)

    request.addfinalizer(detach)


def _roots(tmp_path: Path, session_dir: Path) -> list[Path]:
    home = prefect_home()
    return [tmp_path, session_dir] + ([] if home.is_relative_to(session_dir) else [home])


def test_ceremony_claim_and_approval_leave_no_key_pin_or_passphrase_anywhere(  # type: ignore[no-untyped-def]
        fleet, tmp_path: Path, session_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        request: pytest.FixtureRequest) -> None:
    _capture_prefect_loggers(caplog, request)
    claim = _claim_fleet(fleet, tmp_path, 12, (0, 1, 2), monkeypatch)
    serials = claim.serials
    misbehaving = dict(zip(serials[1::2], MODES, strict=False))
    assert len(misbehaving) == len(MODES)
    report = ceremony.ceremony(fleet.settings, fleet.engine,
                               officers(fleet, ceremony.ACTION, {"renew": []}))
    assert set(report.made) == set(profiles.CAS)  # a fresh inventory: root and every sub-CA

    claim.set_modes(misbehaving)
    first = claim.run(vendor="acme")
    assert first.is_completed(), first.message
    result = first.result()
    assert set(result["claimed"]) == set(serials) - set(misbehaving)
    assert not {serials[1], serials[3], serials[5]} & set(result["claimed"])  # fail/silent/lie_ok
    assert result["certified"], "no operational certificate was issued"

    approver_dir = tmp_path / "approver"
    passphrase = _enrol_approver(fleet, approver_dir, monkeypatch)
    claim.set_modes({s: "ok" for s in misbehaving})
    second = _approved_claim(claim.params(vendor="acme"))
    assert second.is_completed(), second.message
    runs = [s.state_details.flow_run_id for s in (first, second)]
    with db.snapshot(fleet.engine) as session:
        accepted = trail.events(session, limit=50, action="request.accepted")
    assert [e.principal for e in accepted if e.flow_run_id == str(runs[1])] == [APPROVER]
    events = sum(wait_for_flow_run_events(run) for run in runs)

    # The needles.
    records = list(read_meter_secrets(claim.files.secrets))
    assert {r["suite"] for r in records} == {0, 1, 2}
    hes = claim.hes()
    dso = _dso_keys(hes, {r["serial"]: r for r in records})
    assert len(dso) == 12 * len(KeyId), "every meter should hold the DSO's keys now"
    root = ceremony.root_token_settings(fleet.settings)
    assert root.pin_file is not None and root.pin_file.is_file()
    root_pins = [p for p in (root.pin_file, root.so_pin_file) if p is not None and p.is_file()]
    key_file = approver_dir / f"{APPROVER}.key.pem"
    assert key_file.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    pass_bytes = passphrase.read_text(encoding="utf-8").strip().encode()
    private = _private_keys(fleet, approver_dir, hes)
    assert sum(k.startswith("meter:") for k in private) >= 2 * len(result["certified"])
    needles = {**secret_scan.needles(records, fleet.settings.secrets_dir),
               **secret_scan.needles_of_keys(dso),
               **secret_scan.needles_of_secret_files(root_pins),
               **secret_scan.needles_of_secret_files([passphrase], "passphrase"),
               **secret_scan.needles_of_private_keys(
                   private, {f"principal:{APPROVER}": pass_bytes})}

    # Where secrets belong: the simulator's meter secrets and HES state (meters hold keys in
    # clear), the manufacturers' signing and CA keys, the tokens and their PIN files, the test
    # principals' keys (unencrypted PEM by design of tests/identities.py), and the approver's
    # passphrase file (it is the passphrase, as METERKEYS_PRINCIPAL_KEY_PASSPHRASE_FILE names
    # it). The approver's key file is encrypted, so it is scanned.
    settings = fleet.settings
    exclude = {claim.files.secrets, claim.hes_dir, session_dir / "manufacturers",
               settings.token_dir, settings.secrets_dir, fleet.ids.key_dir, passphrase}
    out = capsys.readouterr()
    captured = out.out + out.err + caplog.text
    # Rich wraps the console lines; and compare to booleans, so a failure shows no output.
    flat = " ".join(captured.split())
    approved_here = "ownership-claim" in flat and f"approval of {APPROVER}" in flat
    assert approved_here, "the approval's console output was not captured"
    hits, stats = scan_everything(needles=needles, db_url=fleet.db_url, exclude=exclude,
                                  captured=captured, roots=_roots(tmp_path, session_dir))
    assert stats["prefect_db_files"] >= 1 and stats[f"files:{tmp_path.name}"] >= 4
    assert stats["logs"] > 0 and stats["artifacts"] > 0 and stats["flow_runs"] >= 3
    assert stats["task_runs"] > 0 and events > 0
    assert_no_secret_text(hits, needles)
    assert hits == [], "secret material found:\n" + "\n".join(sorted(set(hits)))


# --- the scan can fail --------------------------------------------------------------------------
def test_scan_finds_a_dso_key_planted_on_purpose(fleet, tmp_path: Path, session_dir: Path,  # type: ignore[no-untyped-def]
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    claim = _claim_fleet(fleet, tmp_path, 2, (0,), monkeypatch)
    state = claim.run(vendor="acme")
    assert state.is_completed(), state.message
    records = {r["serial"]: r for r in read_meter_secrets(claim.files.secrets)}
    dso = _dso_keys(claim.hes(), records)
    assert len(dso) == 2 * len(KeyId)
    operator = "principal:test-operator"
    needles = {**secret_scan.needles_of_keys(dso), **secret_scan.needles_of_private_keys(
        {operator: fleet.ids.key_path("test-operator").read_bytes()})}
    victim = sorted(dso)[0]
    key = dso[victim]
    scalar, _ = secret_scan.private_scalar(fleet.ids.key_path("test-operator").read_bytes())
    # As an attacker (or a careless line of code) would leave it: in plain SQL, a log line
    # and an artifact of a Prefect run.
    _plant_inventory(fleet.db_url, key.hex())
    _plant_log(f"{key.hex().upper()} and {scalar.hex()}")
    _plant_artifact(secret_scan.needles_of_keys({victim: key})[f"{victim}/base64"].decode())

    hits, _ = scan_everything(needles=needles, db_url=fleet.db_url, roots=[tmp_path],
                              exclude={claim.files.secrets, claim.hes_dir})
    for where, form in [("sqlite inventory.db:principal", "hex-lower"),
                        ("api log ", "hex-upper"), ("api artifact planted-key", "base64")]:
        assert any(h.startswith(where) and h.endswith(f": {victim}/{form}") for h in hits), \
            (where, form, sorted(needle_names(hits)))
    assert any(h.startswith("api log ") and h.endswith(f": {operator}/hex-lower") for h in hits)
    # Only what was planted is found; forms that coincide (base64 without +/) count as one.
    forms = {name for name in needles if name.startswith((f"{victim}/", f"{operator}/"))}
    assert needle_names(hits) <= forms and len(needle_names(hits)) >= 4
    assert_no_secret_text(hits, needles)
