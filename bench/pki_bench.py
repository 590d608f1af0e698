"""Benchmark of device certificate issuing: build, HSM signature, verification, recording.

    .venv/bin/python bench/pki_bench.py --certs 20000 --workers 2

In one run, in a fresh embedded home: initialise the token, run the ceremony (no principals:
the benchmark acts as the unattended set-up), then issue ``--certs`` P-256 device certificates
with the device CA through ``lifecycle.pki.steps.issue`` (chunks of ``ISSUE_CHUNK`` over
``--workers`` spawned HSM workers; 0 = in this process), which builds each certificate with
cryptography, signs its TBS in the HSM (CKM_ECDSA), verifies it under the CA's key and records it
in the inventory. Also measured: the same issuing without the inventory (``issue_only``) and the
HSM's raw ECDSA P-256 rate on digests in one process (``hsm_sign_per_s``, the ceiling of the
HSM part). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.umask(0o077)
    import bench_db

    with bench_db.home_dir(None, "pki-bench-") as root:
        run(args, root / "home")


def run(args: argparse.Namespace, home: Path) -> None:
    """Issue ``args.certs`` certificates in a fresh installation at ``home``."""
    os.environ["METERKEYS_HOME"] = str(home)
    os.environ.pop("METERKEYS_PIN", None)
    os.environ.pop("METERKEYS_DATABASE_URL", None)

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from lifecycle.clock import utcnow
    from lifecycle.config import load_settings
    from lifecycle.hsm.connection import Hsm
    from lifecycle.hsm.pool import HsmWorkers
    from lifecycle.installation import steps as installation
    from lifecycle.inventory import db
    from lifecycle.pki import ceremony, profiles, steps
    from lifecycle.pki.issuing import DeviceRequest, IssueJob, issue_job

    settings = load_settings()
    engine = db.make_engine(settings.db_url)
    db.migrate(engine)
    installation.init(settings, engine, make_pin_files=True)
    ceremony.ceremony(settings, engine, installation.UNATTENDED)
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for _ in range(256)]
    requests = [DeviceRequest(f"42454E{i:010X}", keys[i % len(keys)],
                              profiles.USAGES[i % 2], f"BEN{i:010d}") for i in range(args.certs)]

    who = steps.issuer(settings, engine, profiles.DEVICE_P256)
    with Hsm.open(settings).session() as hs:
        digests = [bytes(32)] * 5000
        hs.sign_digests(who.key_label, digests[:10])
        t0 = time.perf_counter()
        hs.sign_digests(who.key_label, digests)
        sign_rate = len(digests) / (time.perf_counter() - t0)

    workers = HsmWorkers(settings, args.workers)
    try:
        chunk = steps.ISSUE_CHUNK
        warm = [workers.submit(issue_job, IssueJob(who, tuple(requests[:10]), utcnow()))
                for _ in range(max(args.workers, 1))]
        for future in warm:
            workers.result(future)
        t0 = time.perf_counter()
        futures = [workers.submit(issue_job, IssueJob(who, tuple(requests[i:i + chunk]),
                                                      utcnow()))
                   for i in range(0, len(requests), chunk)]
        issued_only = sum(len(workers.result(f)) for f in futures)
        only_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        issued = steps.issue(settings, engine, installation.UNATTENDED, profiles.DEVICE_P256,
                             requests, utcnow(), workers if args.workers else None)
        seconds = time.perf_counter() - t0
    finally:
        workers.close()
    result = {"certs": len(issued), "workers": args.workers, "seconds": round(seconds, 3),
              "certs_per_s": round(len(issued) / seconds),
              "issue_only_certs_per_s": round(issued_only / only_s),
              "hsm_sign_per_s": round(sign_rate)}
    print(f"issued and recorded {len(issued)} P-256 device certificates in {seconds:.2f} s "
          f"with {args.workers} worker(s): {result['certs_per_s']}/s; without the inventory "
          f"{result['issue_only_certs_per_s']}/s; HSM ECDSA P-256 ceiling (1 process) "
          f"{result['hsm_sign_per_s']}/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
