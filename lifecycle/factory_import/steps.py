"""Factory import steps: verify a batch, then take its meters' keys into custody chunk by chunk.

Steps (DESIGN.md process 1):
1. ``verify_batch``: the delivery is copied into a private staging folder (``staging``) and from
   then on read only there; the manifest (strict JSON, every field, the manufacturer's ECDSA
   signature), the file's SHA-256 and record count, the transport key (RSA-OAEP unwrap in the
   HSM) and that it unwraps the file's keys. Any failure rejects the whole file before a single
   meter is written.
2. ``import_chunk``: each key is unwrapped from the transport key in the HSM (the RFC 3394
   integrity check catches tampering) and re-wrapped under the storage KEK; meters, key blobs,
   quarantined rows and audit events of the chunk commit in one transaction.
3. ``finish_batch``: counts from the inventory, which must add up to the manifest's record
   count; batch marked completed, audited, its staged copy removed.

Re-running is safe at every point: a row whose meter is already in the inventory from the same
batch and row is skipped, so a run killed half way and re-run imports every good row once.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import BatchError, ChecksumError, IntegrityError, ManifestError
from lifecycle.factory_import import batch_format as batch
from lifecycle.factory_import import staging
from lifecycle.factory_import.reader import Chunk, Mapping, count_records, read_chunks
from lifecycle.factory_import.rewrap import (
    FACTORY_VERSION,
    RewrapJob,
    Sealed,
    forget_transport_keys,
    run_rewrap,
)
from lifecycle.factory_import.rules import check_totals, sort_chunk
from lifecycle.factory_import.vendor import import_public_pem
from lifecycle.hsm import keyring
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.inventory import batches, meters, vendors
from lifecycle.inventory.batches import BatchStatus, ImportBatch
from lifecycle.inventory.db import Engine, refresh_statistics, transaction
from lifecycle.inventory.meters import KeyState, MeterState
from lifecycle.policy import CRYPTOPERIODS, KeyId

# Writers of one process take turns, so that the duplicate check and the insert of a chunk see
# the inventory as it is (SQLite serialises writers anyway; PostgreSQL keeps its unique
# constraints as the last word across processes).
_WRITE_LOCK = threading.Lock()
PROBE_ROWS = 16


@dataclass(frozen=True)
class BatchPlan:
    """What the chunk steps need to know of a verified batch; holds no key material."""

    batch_id: int
    vendor: str
    vendor_id: int
    file: str
    file_sha256: str
    record_count: int
    status: str
    import_key_label: str
    oaep_hash: str
    staged_file: str = ""  # the private copy that every step after verification reads

    @property
    def completed(self) -> bool:
        """Whether an earlier run already completed this delivery."""
        return self.status == BatchStatus.COMPLETED


@dataclass(frozen=True)
class ChunkResult:
    imported: int
    quarantined: int
    skipped: int


@dataclass(frozen=True)
class BatchSummary:
    batch_id: int
    file: str
    vendor: str
    record_count: int
    imported: int
    quarantined: int
    by_suite: dict[int, int]
    status: str


def load_mapping(engine: Engine, vendor: str, override: str | None = None) -> Mapping:
    """Return the vendor's mapping, or the one in the file ``override``.

    Raises:
        InventoryError: unknown vendor.
        BatchError: the vendor has no mapping, or it is invalid.
    """
    with transaction(engine) as session:
        record = vendors.get_vendor(session, vendor)
        text, source = record.mapping, f"mapping of vendor {vendor}"
    if override:
        text, source = Path(override).read_text(encoding="utf-8"), override
    if not text:
        raise BatchError(vendor, "vendor has no column mapping: set one with vendor add --mapping")
    return Mapping.parse(text, source)


def load_manifest(engine: Engine, settings: Settings, data_file: Path,
                  vendor: str) -> batch.Manifest:
    """Load and verify a batch manifest against the vendor's keys.

    Raises:
        ManifestError: see ``batch.load_manifest``; or the vendor has no import key.
    """
    with transaction(engine) as session:
        record = vendors.get_vendor(session, vendor)
        signing_pem, label, oaep = record.signing_key_pem, record.import_key_label, record.oaep_hash
    if not label:
        raise ManifestError(data_file.name, f"vendor {vendor} has no import key: run "
                                            "meterkeys vendor import-key")
    import_pem = import_public_pem(settings, label)
    manifest = batch.load_manifest(data_file, signing_pem, import_pem, vendor)
    if manifest.oaep_hash != oaep:
        raise ManifestError(data_file.name, f"transport key algorithm {manifest.transport_alg} "
                                            f"is not the one agreed with {vendor}")
    return manifest


def verify_batch(engine: Engine, settings: Settings, actor: Actor, data_file: Path,
                 vendor: str, mapping: Mapping, now: datetime) -> BatchPlan:
    """Stage a batch, verify it as a whole and register it (or find it registered by an earlier
    run). The plan names the staged copy, which the later steps read instead of ``data_file``.

    Raises:
        BatchError: the file is rejected as a whole (the rejection is audited, the staged
            copy removed).
        InventoryError: unknown vendor.
    """
    staged: staging.Staged | None = None
    try:
        staged = staging.stage(settings.home_dir, data_file)
        return _verify(engine, settings, actor, staged.data_file, vendor, mapping, now)
    except BatchError as exc:
        if staged is not None:
            staging.remove(staged.folder)
        _audit_reject(engine, actor, data_file.name, vendor, exc, now)
        raise


def _audit_reject(engine: Engine, actor: Actor, name: str, vendor: str, exc: BatchError,
                  now: datetime, batch_id: int | None = None) -> None:
    with transaction(engine) as session:
        trail.record(session, actor, "batch.reject", "rejected", batch_id=batch_id,
                     detail={"file": name, "vendor": vendor, "reason": exc.reason[:300]},
                     at=now)


def _verify(engine: Engine, settings: Settings, actor: Actor, data_file: Path,
            vendor: str, mapping: Mapping, now: datetime) -> BatchPlan:
    # ``data_file`` is the staged copy: nothing here reads the delivered original.
    manifest = load_manifest(engine, settings, data_file, vendor)
    sha = batch.check_file(data_file, manifest)
    with transaction(engine) as session:
        record = vendors.get_vendor(session, vendor)
        vendor_id, label = int(record.id or 0), str(record.import_key_label)
        known = batches.find_batch(session, vendor_id, sha, manifest.sha256)
        if known is not None and known.status == BatchStatus.COMPLETED:
            return _plan(known, vendor, label, manifest, data_file)
    batch.check_count(data_file, manifest, count_records(data_file, mapping))
    _probe_transport_key(settings, data_file, mapping, manifest, label)
    with transaction(engine) as session:
        known = batches.find_batch(session, vendor_id, sha, manifest.sha256)
        if known is None:
            known = batches.add_batch(
                session, vendor_id=vendor_id, file_name=data_file.name, file_sha256=sha,
                manifest_sha256=manifest.sha256,
                batch_ref=manifest.batch_ref, record_count=manifest.record_count,
                status=BatchStatus.IMPORTING, flow_run_id=actor.flow_run_id, started_at=now)
        trail.record(session, actor, "batch.verify", "ok", batch_id=known.id,
                     detail={"file": data_file.name, "sha256_prefix": sha[:16],
                             "records": manifest.record_count, "batch_ref": manifest.batch_ref},
                     at=now)
        return _plan(known, vendor, label, manifest, data_file)


def _plan(record: ImportBatch, vendor: str, label: str, manifest: batch.Manifest,
          staged: Path) -> BatchPlan:
    return BatchPlan(batch_id=int(record.id or 0), vendor=vendor, vendor_id=record.vendor_id,
                     file=record.file_name, file_sha256=record.file_sha256,
                     record_count=record.record_count, status=record.status,
                     import_key_label=label, oaep_hash=manifest.oaep_hash,
                     staged_file=str(staged))


def _probe_transport_key(settings: Settings, data_file: Path, mapping: Mapping,
                         manifest: batch.Manifest, label: str) -> None:
    # A transport key that unwraps under RSA but is not the one the keys were wrapped with
    # would quarantine every row; reject the file instead, before anything is written. The
    # RSA unwrap always runs; then the keys of the first well-formed rows are tried.
    keys: list[bytes] = []
    for chunk in read_chunks(data_file, mapping, 256):
        keys += [k for row in chunk.keys for k in row]
        if len(keys) >= PROBE_ROWS * len(KeyId):
            break
    keys = keys[:PROBE_ROWS * len(KeyId)]
    job = RewrapJob(label, manifest.oaep_hash, manifest.wrapped_transport_key, keys)
    try:
        results = run_rewrap(settings, job)
    except IntegrityError:
        raise BatchError(data_file.name, "transport key does not unwrap under the vendor's "
                                         "import key (wrong transport key)") from None
    finally:
        # The import's own workers unwrap the transport key again; this process keeps none.
        forget_transport_keys(settings)
    if keys and not any(results):
        raise BatchError(data_file.name, "transport key unwraps none of the file's keys "
                                         "(wrong transport key)")


class ChunkOrder:
    """Lets chunks be stored in file order while their HSM work runs in parallel.

    File order decides which of two rows with the same serial is "first": the later one is
    quarantined as a duplicate, on every run alike.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done: set[int] = set()
        self._next = 0

    def wait_turn(self, index: int, timeout: float = 600.0) -> None:
        """Block until every chunk before ``index`` is stored (or has given up)."""
        with self._cond:
            self._cond.wait_for(lambda: self._next >= index, timeout=timeout)

    def release(self, index: int) -> None:
        """Mark a chunk as finished (stored or failed) so later chunks may go on."""
        with self._cond:
            self._done.add(index)
            while self._next in self._done:
                self._next += 1
            self._cond.notify_all()


def rewrap_chunk(workers: HsmWorkers, settings: Settings, plan: BatchPlan,
                 manifest: batch.Manifest, chunk: Chunk) -> list[Sealed | None]:
    """Re-wrap every key of a chunk under its storage KEK in the HSM and bind each blob to its
    meter, key id, version and KEK (``None``: the key's integrity check failed).

    Raises:
        HsmError: the HSM failed as a whole (transient errors may be retried).
    """
    keys = [k for row in chunk.keys for k in row]
    job = RewrapJob(plan.import_key_label, plan.oaep_hash, manifest.wrapped_transport_key, keys,
                    list(zip(chunk.serial, chunk.system_title, strict=True)),
                    keyring.trusted_pins())
    return workers.result(workers.submit(run_rewrap, job))


def store_chunk(engine: Engine, settings: Settings, actor: Actor, plan: BatchPlan,
                chunk: Chunk, blobs: list[Sealed | None], now: datetime) -> ChunkResult:
    """Write a chunk's meters, key blobs, quarantined rows and audit events in one transaction.

    Raises:
        InventoryError: the database refused the write (nothing of the chunk is kept).
    """
    per_meter = len(KeyId)
    with _WRITE_LOCK, transaction(engine) as session:
        by_serial, by_title = meters.existing_meters(session, chunk.serial, chunk.system_title)
        by_digest = meters.digest_holders(session, [d for row in chunk.source_digests
                                                    for d in row])
        decided = sort_chunk(plan.batch_id, chunk.rows, chunk.serial, chunk.system_title, blobs,
                             by_serial, by_title, chunk.source_digests, by_digest)
        rows, keys, events = [], [], []
        for i in decided.accepted:
            meter_blobs = blobs[i * per_meter:(i + 1) * per_meter]
            rows.append(_meter_row(plan, chunk, i, now))
            keys.append(_key_rows(settings, chunk.suite[i], meter_blobs, now))
            for row, digest in zip(keys[-1], chunk.source_digests[i], strict=True):
                row["source_digest"] = digest
            events.append({"action": "meter.register", "outcome": "ok",
                           "meter_serial": chunk.serial[i], "batch_id": plan.batch_id,
                           "detail": {"row": chunk.rows[i], "suite": chunk.suite[i],
                                      "hsm": "rewrap", "key_ids": [int(k) for k in KeyId],
                                      "version": 1, "kek_label": settings.storage_kek_label}})
        meters.insert_meters(session, rows, keys)
        fresh = batches.quarantine(session, plan.batch_id, [*chunk.rejects, *decided.rejects])
        events += [{"action": "row.quarantine", "outcome": "rejected",
                    "meter_serial": r.get("serial"), "batch_id": plan.batch_id,
                    "detail": {"row": r["row"], "field": r["field"], "reason": r["reason"]}}
                   for r in fresh]
        trail.record_many(session, actor, events, at=now)
        batches.bump_batch(session, plan.batch_id, len(rows), len(fresh))
        with Hsm.open(settings).session() as hsm:
            trail.maybe_checkpoint(session, hsm, settings, at=now)
    refresh_statistics(engine)  # the next chunk's reads plan against this one's rows
    return ChunkResult(imported=len(rows), quarantined=len(fresh), skipped=decided.skipped)


def _meter_row(plan: BatchPlan, chunk: Chunk, i: int, now: datetime) -> dict[str, Any]:
    return {"serial": chunk.serial[i], "system_title": chunk.system_title[i],
            "suite": chunk.suite[i], "vendor_id": plan.vendor_id, "batch_id": plan.batch_id,
            "source_row": chunk.rows[i], "state": MeterState.REGISTERED,
            "factory_certificate": chunk.certificate[i], "created_at": now, "updated_at": now}


def _key_rows(settings: Settings, suite: int, sealed: Sequence[Sealed | None],
              now: datetime) -> list[dict[str, Any]]:
    # Factory keys are what the meter holds today: active from import, until their
    # cryptoperiod (NIST SP 800-57 Part 1 §5.3) runs out.
    rows = []
    for k, key in zip(KeyId, sealed, strict=True):
        assert key is not None  # rules.sort_chunk quarantines a meter with a key that failed
        rows.append({"key_id": int(k), "version": FACTORY_VERSION, "state": KeyState.ACTIVE,
                     "blob": key.blob, "mac": key.mac, "kek_label": key.kek_label,
                     "origin": "factory", "created_at": now, "activated_at": now,
                     "expires_at": now + CRYPTOPERIODS[k]})
    return rows


def finish_batch(engine: Engine, settings: Settings, actor: Actor, plan: BatchPlan,
                 now: datetime) -> BatchSummary:
    """Mark a batch completed with its counts taken from the inventory, audit it, sign an audit
    checkpoint with the HSM audit key (so the batch's events are anchored), and remove the
    batch's staged copy.

    Raises:
        ChecksumError: imported and quarantined rows do not add up to the record count (the
            batch stays importing; the failure is audited as a rejection).
        HsmError: the checkpoint could not be signed (the batch stays importing; re-run).
    """
    try:
        summary = _finish(engine, settings, actor, plan, now)
    except ChecksumError as exc:
        _audit_reject(engine, actor, plan.file, plan.vendor, exc, now, plan.batch_id)
        _unstage(plan)
        raise
    _unstage(plan)
    return summary


def _unstage(plan: BatchPlan) -> None:
    if plan.staged_file:
        staging.remove(Path(plan.staged_file).parent)


def _finish(engine: Engine, settings: Settings, actor: Actor, plan: BatchPlan,
            now: datetime) -> BatchSummary:
    with transaction(engine) as session, Hsm.open(settings).session() as hsm:
        record = batches.get_batch(session, plan.batch_id)
        imported = meters.count_in_batch(session, plan.batch_id)
        rejected = batches.rejected_count(session, plan.batch_id)
        by_suite = meters.suite_counts(session, plan.batch_id)
        if record.status != BatchStatus.COMPLETED:
            check_totals(plan.file, record.record_count, imported, rejected)
            record.status = BatchStatus.COMPLETED
            record.finished_at = now
            record.imported, record.quarantined = imported, rejected
            trail.record(session, actor, "batch.complete", "ok", batch_id=plan.batch_id,
                         detail={"imported": imported, "quarantined": rejected}, at=now)
        trail.checkpoint(session, hsm, settings, at=now)  # closes the run, re-runs too
        return BatchSummary(batch_id=plan.batch_id, file=plan.file, vendor=plan.vendor,
                            record_count=plan.record_count, imported=imported,
                            quarantined=rejected, by_suite=by_suite, status=record.status)


def quarantine_report(engine: Engine, batch_id: int) -> list[dict[str, Any]]:
    """Return the quarantined rows of a batch (file order) for reports and artifacts."""
    with transaction(engine) as session:
        return [{"row": q.row, "field": q.field, "reason": q.reason, "serial": q.serial or ""}
                for q in batches.quarantine_list(session, batch_id)]


def rewrap_workers(settings: Settings, workers: int) -> HsmWorkers:
    """Start the HSM workers of an import (``0``: the work runs in this process, and its
    transport keys are destroyed when the workers are closed)."""
    return HsmWorkers(settings, workers, cleanup=forget_transport_keys)
