"""Benchmark of the ownership claim against the raw ceiling of the HSM for the same work.

    .venv/bin/python bench/claim_bench.py --meters 2000 --workers 2

In one run, in a fresh embedded home: a token, an inventory, principals with keys, the vendor
acme with its factory CAs registered, a batch of ``--meters`` meters (suites 0 and 1, round
robin: half of them get two operational certificates) imported through the factory-import flow,
the PKI ceremony, and a simulated HES over the batch's meters. Then:

1. the HSM ceiling for the claim's HSM work, per meter: the key transfer (binding MAC of the
   factory master, master unwrap, GBEK, GAK, KEK generated and wrapped for storage and for the
   meter, their MACs; then the new master's MAC and unwrap, the GUEK generated and wrapped
   twice, its MAC), two proof checks (one per order: GUEK blob MAC, unwrap, AES-GCM, compare)
   and, for a suite 1 meter, two ECDSA P-256 certificate signatures: a tight loop through the
   HSM layer, no pool, database, Prefect or simulator, in one process and in N spawned
   processes;
2. the ownership-claim flow on every meter with N HSM workers. The simulated meters' own work
   (unwrapping, ciphering proofs, key pairs and certificate requests) and the simulator's state
   file are measured by the simulated HES (CPU seconds of its thread) and subtracted. So that
   subtracting them removes only a pause, the HSM worker processes are stopped while the
   simulated HES runs (``QuietHes``): they never work alongside it.

The last line printed is JSON: meters, certificates, seconds (flow, wall), sim_seconds (the
simulator's share), claim_seconds (the difference), meters_per_s and certificates_per_s (over
claim_seconds; a chunk's certificates are issued while the next chunks are claimed, so the
certification is not timed apart: ``bench/pki_bench.py`` measures the issuing rate alone),
hsm_ceiling_meters_per_s (1 process), hsm_ceiling_workers_meters_per_s (N): each the higher
of two measurements, before and after the claim (``hsm_ceilings_before_after``: 1 and N
processes before, then after), ratio (meters_per_s / N-process ceiling), ceiling_scaling and
ceiling_steady (for the measurement the N-process ceiling is from: how it compares with N
times the 1-process one, and whether that is what free cores give: ``bench/ceiling.py``; a
warning says when not). Then where the processor time went: ``cpu_ms_per_meter`` (the flow's
process less the simulation, the HSM workers, the Prefect server), ``claim_cpu_ms_per_meter``
(their sum), ``hsm_cpu_ms_per_meter`` (the HSM loop's, the least of its runs) and ``cpu_ratio``
(the second over the first: what the ratio could reach if the claim had the cores to itself and
kept them busy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _ceiling_worker(args: tuple[dict[str, str], list[dict[str, Any]], int, float, str,
                                float]) -> tuple[int, float, float]:
    """The claim's HSM work for ``n_meters`` meters in a tight loop, from ``start_at``."""
    env, masters, n_meters, suite1_share, ca_label, start_at = args
    os.environ.update(env)
    from lifecycle.config import load_settings
    from lifecycle.hsm import dlms_ops
    from lifecycle.hsm.connection import Hsm
    from lifecycle.meter_keys.binding import BlobContext, message
    from lifecycle.policy import KeyId, storage_kek_role

    s = load_settings()
    first_ids = [KeyId.GBEK, KeyId.GAK, KeyId.KEK]
    first_labels = [s.kek_label(storage_kek_role(k)) for k in first_ids]
    guek_label = s.kek_label(storage_kek_role(KeyId.GUEK))
    chunk = 250
    with Hsm.open(s).session() as hs:
        while time.time() < start_at:
            time.sleep(0.001)
        t0, cpu0 = time.perf_counter(), time.process_time()
        done = 0
        while done < n_meters:
            part = [masters[(done + i) % len(masters)] for i in range(chunk)]
            ok = hs.verify_mac(s.blob_mac_label, [message(BlobContext(
                m["serial"], m["title"], KeyId.KEK, 1, s.master_kek_label), m["blob"])
                for m in part], [m["mac"] for m in part])
            assert all(ok)
            made = [dlms_ops.new_dlms_keys(hs, s.master_kek_label, m["blob"], first_labels,
                                           [int(k) for k in first_ids], 128) for m in part]
            hs.mac(s.blob_mac_label, [message(BlobContext(m["serial"], m["title"], k.key_id, 2,
                                                          first_labels[j]), k.blob)
                                      for m, keys in zip(part, made, strict=True)
                                      for j, k in enumerate(keys)])
            masters2 = [keys[2].blob for keys in made]
            macs2 = hs.mac(s.blob_mac_label, [message(BlobContext(
                m["serial"], m["title"], KeyId.KEK, 2, s.master_kek_label), b)
                for m, b in zip(part, masters2, strict=True)])  # stands for the MAC check
            gueks = [dlms_ops.new_dlms_keys(hs, s.master_kek_label, b, [guek_label],
                                            [int(KeyId.GUEK)], 128)[0] for b in masters2]
            guek_macs = hs.mac(s.blob_mac_label, [message(BlobContext(
                m["serial"], m["title"], KeyId.GUEK, 2, guek_label), g.blob)
                for m, g in zip(part, gueks, strict=True)])
            for _order in ("master", "guek"):  # one proof check per order, as the claim
                hs.verify_mac(s.blob_mac_label, [message(BlobContext(
                    m["serial"], m["title"], KeyId.GUEK, 2, guek_label), g.blob)
                    for m, g in zip(part, gueks, strict=True)], guek_macs)
                dlms_ops.gcm_ciphertexts_match(hs, guek_label, [dlms_ops.CiphertextCheck(
                    g.blob, bytes(12), bytes(16), bytes(16)) for g in gueks])
            signatures = int(round(2 * chunk * suite1_share))
            if signatures:
                hs.sign_digests(ca_label, [bytes(32)] * signatures)
            assert len(macs2) == chunk
            done += chunk
        return done, time.perf_counter() - t0, time.process_time() - cpu0


def ceiling(processes: int, n_meters: int, env: dict[str, str], masters: list[dict[str, Any]],
            suite1_share: float, ca_label: str) -> tuple[float, float]:
    """Return meters/s of the raw HSM loop on ``processes`` spawned processes, and the CPU
    milliseconds it took a meter."""
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0
    with ctx.Pool(processes) as pool:
        results = pool.map(_ceiling_worker, [(env, masters, n_meters, suite1_share, ca_label,
                                              start_at)] * processes)
    done = sum(n for n, _, _ in results)
    return done / max(t for _, t, _ in results), 1000 * sum(c for _, _, c in results) / done


def setup(home: Path, meters: int, suites: tuple[int, ...]) -> dict[str, Any]:
    """Token, inventory, principals, acme with its factory CAs, an imported batch, the PKI."""
    from import_bench import installation, run_flow

    from lifecycle import principals
    from lifecycle.clock import utcnow
    from lifecycle.factory_import.vendor import ensure_import_key
    from lifecycle.identity import request, signers
    from lifecycle.installation import steps
    from lifecycle.pki import ceremony
    from lifecycle.pki import steps as pki

    s, engine, maker, mapping, operator = installation(home)
    officers = [signers.FileSigner.load(home / "principals" / f"{name}.key.pem", None)
                for name in ("bench-so", "bench-so-2")]
    for suite in (1, 2):
        params = {"name": "acme", "certificate_pem": maker.factory_ca_pem(suite)}
        signed = [request.make("vendor.add-ca", params, name, principals.installation_id(engine),
                               utcnow(), key)
                  for name, key in zip(("bench-so", "bench-so-2"), officers, strict=True)]
        actor = principals.authorize(engine, s, signed, "vendor.add-ca", params, at=utcnow())
        pki.add_vendor_ca(engine, actor, "acme", params["certificate_pem"], utcnow(),
                          requests=signed)
    ceremony.ceremony(s, engine, steps.UNATTENDED)
    pem, oaep = ensure_import_key(engine, s, "acme")
    files = maker.make_batch(out=home / "batch", mapping_path=mapping,
                             import_public_pem=pem.decode(), oaep_hash=oaep, count=meters,
                             suites=suites, batch_ref="BENCH-CLAIM")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        summary, seconds = run_flow(files.data, 2, operator, engine)
    print(f"imported {summary['imported']} meters in {seconds:.1f} s", file=sys.stderr)
    return {"settings": s, "engine": engine, "operator": operator, "files": files,
            "ca_label": pki.issuer(s, engine, "device-p256").key_label}


def masters_of(engine: Any, limit: int) -> list[dict[str, Any]]:
    """The active master key blobs (and MACs) of the first meters, for the ceiling loop."""
    from lifecycle.inventory import meters
    from lifecycle.inventory.db import transaction
    from lifecycle.policy import KeyId

    out = []
    with transaction(engine) as session:
        for meter in meters.list_meters(session, limit=limit):
            kek = next(k for k in meters.key_versions(session, int(meter.id or 0))
                       if k.key_id == KeyId.KEK and k.state == "active")
            out.append({"serial": meter.serial, "title": meter.system_title,
                        "blob": bytes(kek.blob), "mac": bytes(kek.mac or b"")})
    return out


class QuietHes:
    """The simulated HES, run while the claim's HSM workers are stopped.

    The flow makes the next chunk's keys while it settles the current one, so the simulated
    meters would otherwise run alongside the workers and their subtracted time would hide HSM
    work done meanwhile. Each call to the HES stops the HSM worker processes (SIGSTOP) and
    continues them when it returns: no HSM work moves while the simulation runs, so
    subtracting its time removes a pause and nothing else. (Waiting instead for the jobs in
    flight to finish before each call left a core idle while the slower worker finished; the
    calls waited 11 s in all in a 49 s run of 20,000 meters, and the same code measured 0.51
    that way against 0.55 this way.)
    """

    GATED = ("submit", "outcomes", "prove", "certificate_requests", "import_certificates")

    def __init__(self, hes: Any) -> None:
        self.hes = hes
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.hes, name)
        if name not in self.GATED:
            return value

        def gated(*args: Any, **kwargs: Any) -> Any:
            with self._lock:  # one call at a time, as the claim's own HES wrapper
                stopped = _hsm_workers()
                for process in stopped:
                    with contextlib.suppress(psutil.Error):
                        process.suspend()
                try:
                    return value(*args, **kwargs)
                finally:
                    for process in stopped:
                        with contextlib.suppress(psutil.Error):
                            process.resume()
        return gated


def _hsm_workers() -> list[psutil.Process]:
    """This process's HSM workers: its spawned children (not the resource tracker)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            line = " ".join(child.cmdline())
            if "spawn_main" in line:
                found.append(child)
    return found


def run_claim(ctx: dict[str, Any], hes: Any, workers: int
              ) -> tuple[dict[str, Any], float, dict[str, float]]:
    """Run the claim; return its summary, its wall seconds, and the CPU seconds of the flow's
    process, of the HSM workers, of the Prefect server and (on PostgreSQL on this machine) of
    the database server during it."""
    import bench_db

    import tasks.claim
    from flows.ownership_claim import ownership_claim
    from lifecycle import principals
    from lifecycle.clock import utcnow
    from lifecycle.hes.port import OneAtATime
    from lifecycle.identity import request

    quiet = QuietHes(hes)
    # The bench's instance, to read its meter_seconds; one call at a time, as the claim's own.
    tasks.claim.open_hes = lambda: OneAtATime(quiet)
    params: dict[str, Any] = {"batch_id": None, "vendor": "acme", "serials": None,
                              "wait_seconds": 0.0, "workers": workers}
    signed = request.encode([principals.sign(ctx["engine"], ctx["operator"], "meter.claim",
                                             params, at=utcnow())])
    server = psutil.Process().children(recursive=True)  # the harness's Prefect server
    database = bench_db.ServerCpu().start() if ctx["settings"].database_url else None
    before = (time.process_time(), _children_cpu(), _cpu_of(server))
    t0 = time.perf_counter()
    summary = ownership_claim(**params, request=signed)
    seconds = time.perf_counter() - t0
    # The workers end with the flow (joined: counted as children); the server is still up.
    after = (time.process_time(), _children_cpu(), _cpu_of(server))
    cpu = {name: b - a for name, a, b in zip(("flow", "workers", "prefect_server"), before,
                                              after, strict=True)}
    if database is not None:
        cpu["database"] = database.seconds()
    return summary, seconds, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def main() -> None:
    import bench_db

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ceiling-meters", type=int, default=2000,
                        help="meters per process for the ceiling loops")
    bench_db.add_home_option(parser)
    bench_db.add_database_option(parser)
    args = parser.parse_args()

    with bench_db.home_dir(args.home, "meterkeys-claim-bench-") as home, \
            bench_db.inventory_url(args.database_url) as url:
        run(args, url, home)


def run(args: argparse.Namespace, database_url: str | None, home: Path) -> None:
    """The benchmark in ``home`` on the inventory at ``database_url`` (``None``: SQLite in the
    home)."""

    os.umask(0o077)
    os.environ["METERKEYS_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["METERKEYS_HES"] = f"simulated:{home / 'sim' / 'hes'}"
    for name in ("METERKEYS_PIN", "METERKEYS_DATABASE_URL"):
        os.environ.pop(name, None)
    if database_url is not None:
        os.environ["METERKEYS_DATABASE_URL"] = database_url
    suites = (0, 1)
    ctx = setup(home, args.meters, suites)
    env = {k: v for k, v in os.environ.items() if k.startswith(("METERKEYS_", "PREFECT_"))}
    masters = masters_of(ctx["engine"], 500)
    share = suites.count(1) / len(suites)

    ceiling_cpu: list[float] = []  # CPU ms a meter, per ceiling run

    def ceilings(when: str) -> tuple[float, float]:
        one, cpu_one = ceiling(1, args.ceiling_meters, env, masters, share, ctx["ca_label"])
        many, cpu_many = ceiling(max(1, args.workers), args.ceiling_meters, env, masters,
                                 share, ctx["ca_label"])
        ceiling_cpu.extend((cpu_one, cpu_many))
        print(f"HSM ceiling {when} the claim: {one:,.0f} meters/s (1 process), {many:,.0f} "
              f"meters/s ({args.workers} processes); {cpu_one:.2f} and {cpu_many:.2f} CPU ms "
              "a meter", file=sys.stderr)
        return one, many

    before = ceilings("before")

    from prefect.testing.utilities import prefect_test_harness

    from simulator.hes import SimulatedHes

    hes = SimulatedHes.open(home / "sim" / "hes", [ctx["files"].secrets], engine="cryptography")
    hes.meter_seconds = hes.state_seconds = 0.0
    with prefect_test_harness(server_startup_timeout=120):
        summary, seconds, cpu = run_claim(ctx, hes, args.workers)
    # Measured again after the claim, on this shared machine's other load; the higher of the
    # two is the ceiling (the lower ratio).
    after = ceilings("after")
    one, many = max(before[0], after[0]), max(before[1], after[1])
    import ceiling as check

    scaled = before if before[1] >= after[1] else after  # the measurement the ceiling is from
    ceiling_fields = check.fields(*scaled, args.workers)
    claimed = len(summary["claimed"]) + len(summary["recovered"])
    if claimed != args.meters:
        raise SystemExit(f"claimed {claimed} of {args.meters}: {summary['failed']}")
    certs = 2 * len(summary["certified"])
    sim = hes.meter_seconds + hes.state_seconds
    net = seconds - sim
    rate = args.meters / net
    print(f"claimed {args.meters} meters and issued {certs} certificates in {seconds:.1f} s, "
          f"of which the simulated meters {hes.meter_seconds:.1f} s and the simulator's state "
          f"file {hes.state_seconds:.1f} s: {rate:,.0f} meters/s, {certs / net:,.0f} "
          "certificates/s without them", file=sys.stderr)
    # Where the claim's processor time went, per meter (the simulation's left out), against
    # the HSM loop's: on a machine whose cores were all the claim's, the ratio could reach
    # about ceiling CPU / claim CPU.
    cpu["flow"] -= sim
    claim_cpu = 1000 * sum(cpu.values()) / args.meters
    hsm_cpu = min(ceiling_cpu)
    print("CPU a meter: " + ", ".join(f"{k} {1000 * v / args.meters:.2f} ms"
                                      for k, v in cpu.items())
          + f"; {claim_cpu:.2f} ms in all, against {hsm_cpu:.2f} ms in the HSM loop",
          file=sys.stderr)
    print(json.dumps({
        "meters": args.meters, "certificates": certs, "workers": args.workers,
        "seconds": round(seconds, 2), "sim_seconds": round(sim, 2),
        "sim_meter_seconds": round(hes.meter_seconds, 2),
        "sim_state_seconds": round(hes.state_seconds, 2), "claim_seconds": round(net, 2),
        "meters_per_s": round(rate, 1), "certificates_per_s": round(certs / net, 1),
        "hsm_ceiling_meters_per_s": round(one, 1),
        "hsm_ceiling_workers_meters_per_s": round(many, 1),
        "hsm_ceilings_before_after": [round(v, 1) for v in (*before, *after)],
        "cpu_ms_per_meter": {k: round(1000 * v / args.meters, 3) for k, v in cpu.items()},
        "claim_cpu_ms_per_meter": round(claim_cpu, 3), "hsm_cpu_ms_per_meter": round(hsm_cpu, 3),
        "cpu_ratio": round(hsm_cpu / claim_cpu, 3),
        "ratio": round(rate / many, 3),
        "speedup_vs_one_process_ceiling": round(rate / one, 3),
        **ceiling_fields,
        "database": "postgresql" if database_url else "sqlite"}))


if __name__ == "__main__":
    main()
