"""Prefect tasks of the factory import: thin, batch- and chunk-level wrappers over its steps.

No task returns or persists key material: every task has ``persist_result=False`` and no cache
policy, and what they return (plans, counts, actors) holds none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from lifecycle.audit.chain import Actor
from lifecycle.factory_import import steps as intake
from lifecycle.factory_import.batch_format import Manifest
from lifecycle.factory_import.reader import Chunk, read_chunks
from lifecycle.hsm.pool import HsmWorkers
from tasks import context

RETRY_DELAYS = [1.0, 2.0, 4.0]


@task(name="verify-batch", persist_result=False, cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=context.retry_on_transient)
def verify_batch(file: str, vendor: str, actor: Actor,
                 mapping: str | None) -> intake.BatchPlan:
    """Stage the delivery privately, verify its manifest, checksum, record count and transport
    key, and register the batch; later tasks read only the staged copy the plan names."""
    eng, settings = context.engine(), context.settings()
    plan = intake.verify_batch(eng, settings, actor, Path(file), vendor,
                               intake.load_mapping(eng, vendor, mapping), context.now())
    get_run_logger().info("batch %s of %s: %d records, %s", plan.batch_id, vendor,
                          plan.record_count, plan.status)
    return plan


def chunks(plan: intake.BatchPlan, mapping: str | None) -> Iterator[Chunk]:
    """Read the staged batch file in chunks of canonical, field-checked records."""
    settings = context.settings()
    parsed = intake.load_mapping(context.engine(), plan.vendor, mapping)
    return read_chunks(Path(plan.staged_file), parsed, settings.chunk_size)


def manifest(plan: intake.BatchPlan) -> Manifest:
    """Load the verified (staged) manifest once for the chunks of a run (it holds the transport
    key RSA-wrapped only; it is passed to tasks in memory, never returned by one)."""
    return intake.load_manifest(context.engine(), context.settings(), Path(plan.staged_file),
                                plan.vendor)


def chunk_order() -> intake.ChunkOrder:
    """The coordinator that stores a run's chunks in file order."""
    return intake.ChunkOrder()


def open_workers(workers: int | None) -> HsmWorkers:
    """Start the HSM worker processes of a run (``None``: as many as settings say)."""
    settings = context.settings()
    return intake.rewrap_workers(settings, settings.workers if workers is None else workers)


@task(name="import-chunk", persist_result=False, cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=context.retry_on_transient)
def import_chunk(plan: intake.BatchPlan, manifest: Manifest, chunk: Chunk, workers: HsmWorkers,
                 order: intake.ChunkOrder, actor: Actor) -> intake.ChunkResult:
    """Re-wrap a chunk's keys in the HSM, then store it in file order in one transaction."""
    eng, settings = context.engine(), context.settings()
    try:
        blobs = intake.rewrap_chunk(workers, settings, plan, manifest, chunk)
        order.wait_turn(chunk.index)
        return intake.store_chunk(eng, settings, actor, plan, chunk, blobs, context.now())
    finally:
        order.release(chunk.index)


@task(name="finish-batch", persist_result=False, cache_policy=NO_CACHE)
def finish_batch(plan: intake.BatchPlan, actor: Actor) -> intake.BatchSummary:
    """Mark the batch completed with counts taken from the inventory."""
    return intake.finish_batch(context.engine(), context.settings(), actor, plan, context.now())


@task(name="publish-report", persist_result=False, cache_policy=NO_CACHE)
def publish_report(summary: intake.BatchSummary) -> None:
    """Publish the import summary and the quarantine list as artifacts (no key material)."""
    table = [{"file": summary.file, "vendor": summary.vendor, "records": summary.record_count,
              "imported": summary.imported, "rejected": summary.quarantined,
              **{f"suite {s}": n for s, n in sorted(summary.by_suite.items())}}]
    create_table_artifact(table=table, key=f"import-batch-{summary.batch_id}",
                          description=f"Factory import of {summary.file}")
    rows = intake.quarantine_report(context.engine(), summary.batch_id)
    if rows:
        create_table_artifact(table=rows[:5000], key=f"quarantine-batch-{summary.batch_id}",
                              description=f"Quarantined rows of {summary.file} "
                                          f"({len(rows)} in all)")
    create_markdown_artifact(
        markdown=(f"# Factory import: {summary.file}\n\n{summary.imported} meters imported, "
                  f"{summary.quarantined} rows quarantined, of {summary.record_count}."),
        key=f"import-summary-{summary.batch_id}")
