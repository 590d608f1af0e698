"""Benchmark of the factory import against the raw ceiling of the HSM for the same work.

    .venv/bin/python bench/import_bench.py --meters 100000 --workers 2

In one run: generate a suite-0 batch (CSV), measure the HSM ceiling for the same HSM work (a
tight loop of AES key unwrap + re-wrap under the key's storage KEK + destroy + AES-CMAC binding
of the blob, four keys a meter, through the HSM layer with no pool, database or Prefect) in one
process and in N spawned processes, then import the batch through the factory-import flow with
N HSM workers. The last line printed is JSON: meters, seconds, meters_per_s, workers,
hsm_ceiling_meters_per_s (one process), hsm_ceiling_workers_meters_per_s (N processes), ratio
(import / N-process ceiling), ceiling_scaling and ceiling_steady (how the N-process ceiling
compares with N times the 1-process one, and whether that is what free cores give:
``bench/ceiling.py``; a warning says when not), peak_rss_mb (largest resident set of the flow
process and of each HSM worker, sampled; the Prefect server is not counted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEYS_PER_METER = 4


def _ceiling_worker(args: tuple[dict[str, str], int, bytes, bytes, float]) -> tuple[int, float]:
    """The import's HSM work for ``n_keys`` keys in a tight loop, nothing else, from ``start_at``.

    Per key, as an HSM worker does it: AES key unwrap from the transport key, wrap under the
    storage KEK of its key id, destroy, and an AES-CMAC binding the blob to its meter (the
    binding message built as the import builds it). Lists of 5,000 keys, one lock hold each.
    """
    env, n_keys, wrapped_transport, probe, start_at = args
    os.environ.update(env)
    from lifecycle.config import load_settings
    from lifecycle.hsm.connection import Hsm
    from lifecycle.meter_keys.binding import BlobContext, message
    from lifecycle.policy import KeyId, storage_kek_role

    s = load_settings()
    chunk = 5000
    targets = [s.kek_label(storage_kek_role(KeyId(i % KEYS_PER_METER))) for i in range(chunk)]
    with Hsm.open(s).session() as session:
        transport = session.unwrap_rsa_oaep(env["BENCH_IMPORT_LABEL"], wrapped_transport,
                                            oaep_hash=env["BENCH_OAEP"])
        while time.time() < start_at:
            time.sleep(0.001)
        t0 = time.perf_counter()
        for done in range(0, n_keys, chunk):
            blobs = session.rewrap(transport, [probe] * chunk, targets)
            contexts = [BlobContext(f"BEN{done + i:010d}", "42454E0000000000", i % 4, 1,
                                    targets[i]) for i in range(chunk)]
            session.mac(s.blob_mac_label, [message(c, b or b"") for c, b in
                                            zip(contexts, blobs, strict=True)])
        return len(range(0, n_keys, chunk)) * chunk, time.perf_counter() - t0


def ceiling(processes: int, n_keys: int, env: dict[str, str], wrapped_transport: bytes,
            probe: bytes) -> float:
    """Return meters/s of the raw HSM loop on ``processes`` spawned processes."""
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0
    with ctx.Pool(processes) as pool:
        results = pool.map(_ceiling_worker,
                           [(env, n_keys, wrapped_transport, probe, start_at)] * processes)
    keys = sum(n for n, _ in results)
    seconds = max(t for _, t in results)
    return keys / seconds / KEYS_PER_METER


def setup(home: Path, meters: int) -> dict[str, Any]:
    """Make a token, an inventory, the acme vendor and a suite-0 batch under ``home``."""
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    from lifecycle.factory_import.vendor import ensure_import_key, import_key_label
    from simulator.manufacturer import wrap_transport_key

    s, engine, maker, mapping, operator = installation(home)
    label = import_key_label("acme")
    pem, oaep = ensure_import_key(engine, s, "acme")
    t0 = time.perf_counter()
    files = maker.make_batch(out=home / "batch", mapping_path=mapping,
                             import_public_pem=pem.decode(), oaep_hash=oaep, count=meters,
                             suites=(0,), batch_ref="BENCH-0001")
    generated = time.perf_counter() - t0
    transport = secrets.token_bytes(32)
    return {"files": files, "label": label, "oaep": oaep, "generated_s": generated,
            "operator": operator, "engine": engine,
            "wrapped_transport": wrap_transport_key(transport, pem.decode(), oaep),
            "probe": aes_key_wrap(transport, secrets.token_bytes(16))}


def installation(home: Path) -> tuple[Any, Any, Any, Path, Any]:
    """A token, a migrated inventory, the bench's principals and the vendor acme under
    ``home``; return the settings, the engine, acme's simulated manufacturer, its mapping file
    and the operator's key."""
    from lifecycle.config import load_settings
    from lifecycle.installation import steps
    from lifecycle.inventory import vendors
    from lifecycle.inventory.db import make_engine, migrate, transaction
    from simulator.manufacturer import Manufacturer

    s = load_settings()
    engine = make_engine(s.db_url)
    migrate(engine)
    steps.init(s, engine, make_pin_files=True)
    maker = Manufacturer.create(home / "manufacturer", "acme", "P-256")
    mapping = ROOT / "simulator" / "mappings" / "acme.toml"
    operator = enrol_bench_principals(s, engine, home / "principals")
    with transaction(engine) as session:
        vendors.add_vendor(session, "acme", maker.signing_public_pem(),
                           mapping.read_text(encoding="utf-8"))
    return s, engine, maker, mapping, operator


def enrol_bench_principals(s: Any, engine: Any, folder: Path) -> Any:
    """Enrol two security officers and the operator "bench" with keys made under ``folder``;
    return the operator's key. Signing and checking the one import request is not timed."""
    from lifecycle import principals
    from lifecycle.clock import utcnow
    from lifecycle.identity import request, signers

    folder.mkdir(parents=True, exist_ok=True)
    keys = {}
    for name in ("bench-so", "bench-so-2", "bench"):
        signers.generate(folder, name, "p256", None)
        keys[name] = signers.FileSigner.load(folder / f"{name}.key.pem", None)
    installation = principals.installation_id(engine)

    def signed(name: str, params: dict[str, str], by: list[str]) -> list[Any]:
        return [request.make(principals.ENROL, params, who, installation, utcnow(), keys[who])
                for who in by]

    root = principals.enrolment_params("bench-so", principals.SECURITY_OFFICER,
                                       keys["bench-so"].public_key_pem())
    principals.enrol_root(engine, s, signed("bench-so", root, ["bench-so"])[0],
                          root["public_pem"], at=utcnow())
    for name, role, by in (("bench-so-2", principals.SECURITY_OFFICER, ["bench-so"]),
                           ("bench", principals.OPERATOR, ["bench-so", "bench-so-2"])):
        params = principals.enrolment_params(name, role, keys[name].public_key_pem())
        principals.enrol(engine, s, signed(name, params, by), name, role, params["public_pem"],
                         at=utcnow())
    return keys["bench"]


def run_flow(path: Path, workers: int, operator: Any, engine: Any) -> tuple[dict[str, Any], float]:
    from flows.factory_import import factory_import
    from lifecycle import principals
    from lifecycle.clock import utcnow
    from lifecycle.identity import request

    params: dict[str, Any] = {"file": str(path), "vendor": "acme", "mapping": None,
                              "workers": workers}
    signed = request.encode([principals.sign(engine, operator, "batch.import", params,
                                             at=utcnow())])
    t0 = time.perf_counter()
    summary = factory_import(**params, request=signed)
    return summary, time.perf_counter() - t0


class RssSampler:
    """Samples the RSS of this process and of its HSM worker processes (not Prefect's server)."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self.flow_mb = 0.0
        self.worker_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            self.flow_mb = max(self.flow_mb, self._me.memory_info().rss / 2**20)
            for child in self._me.children(recursive=True):
                try:
                    if "multiprocessing" in " ".join(child.cmdline()):
                        self.worker_mb = max(self.worker_mb, child.memory_info().rss / 2**20)
                except psutil.Error:
                    continue

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.flow_mb = max(self.flow_mb, own)


def main() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_db

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ceiling-meters", type=int, default=20_000,
                        help="meters per process for the ceiling loops")
    bench_db.add_home_option(parser)
    bench_db.add_database_option(parser)
    args = parser.parse_args()
    with bench_db.home_dir(args.home, "meterkeys-bench-") as home, \
            bench_db.inventory_url(args.database_url) as url:
        run(args, url, home)


def run(args: argparse.Namespace, database_url: str | None, home: Path) -> None:
    """The benchmark in ``home`` on the inventory at ``database_url`` (``None``: SQLite in the
    home)."""
    os.environ["METERKEYS_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ.pop("METERKEYS_DATABASE_URL", None)
    if database_url is not None:
        os.environ["METERKEYS_DATABASE_URL"] = database_url
    sys.path.insert(0, str(ROOT))
    ctx = setup(home, args.meters)
    env = {k: v for k, v in os.environ.items() if k.startswith(("METERKEYS_", "PREFECT_"))}
    env |= {"BENCH_IMPORT_LABEL": ctx["label"], "BENCH_OAEP": ctx["oaep"]}
    n_keys = args.ceiling_meters * KEYS_PER_METER
    one = ceiling(1, n_keys, env, ctx["wrapped_transport"], ctx["probe"])
    many = ceiling(max(1, args.workers), n_keys, env, ctx["wrapped_transport"], ctx["probe"])
    print(f"generated {args.meters} meters in {ctx['generated_s']:.1f} s; HSM ceiling "
          f"{one:,.0f} meters/s (1 process), {many:,.0f} meters/s ({args.workers} processes)",
          file=sys.stderr)
    import ceiling as check

    ceiling_fields = check.fields(one, many, args.workers)

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120), RssSampler() as rss:
        summary, seconds = run_flow(ctx["files"].data, args.workers, ctx["operator"],
                                    ctx["engine"])
    if summary["imported"] != args.meters:
        raise SystemExit(f"imported {summary['imported']} of {args.meters}")
    rate = args.meters / seconds
    print(json.dumps({
        "meters": args.meters, "seconds": round(seconds, 2), "meters_per_s": round(rate, 1),
        "workers": args.workers, "hsm_ceiling_meters_per_s": round(one, 1),
        "hsm_ceiling_workers_meters_per_s": round(many, 1), "ratio": round(rate / many, 3),
        "speedup_vs_one_process_ceiling": round(rate / one, 3),
        **ceiling_fields,
        "peak_rss_mb": round(max(rss.flow_mb, rss.worker_mb), 1),
        "peak_rss_flow_mb": round(rss.flow_mb, 1), "peak_rss_worker_mb": round(rss.worker_mb, 1),
        "generate_s": round(ctx["generated_s"], 1),
        "database": "postgresql" if database_url else "sqlite"}))


if __name__ == "__main__":
    main()
