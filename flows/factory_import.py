"""Flow: import a manufacturer's factory batch (DESIGN.md process 1)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from tasks import approval, audit, hsm
from tasks import factory_import as t

if TYPE_CHECKING:
    from lifecycle.factory_import.steps import ChunkResult

ACTION = "batch.import"
IN_FLIGHT_PER_WORKER = 2


@flow(name="factory-import", task_runner=ThreadPoolTaskRunner(max_workers=6),  # type: ignore[arg-type]
      persist_result=False, on_failure=[audit.close_failed_run])
def factory_import(file: str, vendor: str, mapping: str | None = None,
                   workers: int | None = None, request: str | None = None) -> dict[str, Any]:
    """Verify a factory batch and take its meters' keys into custody, chunk by chunk.

    Args:
        file: path of the vendor's data file (its manifest lies beside it).
        vendor: the vendor as onboarded with `meterkeys vendor add`.
        mapping: a mapping file overriding the vendor's stored column mapping.
        workers: HSM worker processes (default: from settings, the number of cores).
        request: the signed request of an operator or security officer over the other four
            parameters (`meterkeys import --submit` fills it in). Leave it empty here: the
            run then waits for `meterkeys approve RUN_ID`.
    """
    params = {"file": file, "vendor": vendor, "mapping": mapping, "workers": workers}
    actor = approval.authorize_run(ACTION, params, request)
    hsm.check_keys()
    plan = t.verify_batch(file, vendor, actor, mapping)
    if not plan.completed:
        _import_chunks(plan, mapping, workers, actor)
    summary = t.finish_batch(plan, actor)
    t.publish_report(summary)
    return {"batch_id": summary.batch_id, "file": summary.file, "records": summary.record_count,
            "imported": summary.imported, "quarantined": summary.quarantined,
            "by_suite": summary.by_suite}


def _import_chunks(plan: Any, mapping: str | None, workers: int | None, actor: Any) -> None:
    progress: Any = create_progress_artifact(progress=0.0, key=f"import-progress-{plan.batch_id}")
    pending: deque[PrefectFuture[ChunkResult]] = deque()
    done = 0
    with t.open_workers(workers) as pool:
        order = t.chunk_order()
        manifest = t.manifest(plan)
        ahead = IN_FLIGHT_PER_WORKER * max(1, pool.workers)
        for chunk in t.chunks(plan, mapping):
            pending.append(t.import_chunk.submit(  # type: ignore[call-overload]
                plan, manifest, quote(chunk), quote(pool), quote(order), actor))
            while len(pending) > ahead:
                done += _settle(pending.popleft())
                update_progress_artifact(progress, 100.0 * done / max(1, plan.record_count))
        while pending:
            done += _settle(pending.popleft())
    update_progress_artifact(progress, 100.0)


def _settle(future: PrefectFuture[ChunkResult]) -> int:
    result = future.result()
    return result.imported + result.quarantined + result.skipped
