"""Flow: take meters over from their manufacturer (DESIGN.md process 2, the ownership claim)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from tasks import approval, audit, hsm
from tasks import claim as t

ACTION = "meter.claim"
PREPARE_AHEAD = 2  # chunks whose keys are made ahead of the one being settled


@flow(name="ownership-claim", task_runner=ThreadPoolTaskRunner(max_workers=6),  # type: ignore[arg-type]
      persist_result=False, on_failure=[audit.close_failed_run])
def ownership_claim(batch_id: int | None = None, vendor: str | None = None,
                    serials: list[str] | None = None, wait_seconds: float = 30.0,
                    workers: int | None = None, request: str | None = None) -> dict[str, Any]:
    """Replace the factory keys of registered meters by the DSO's, proven by each meter.

    Args:
        batch_id: claim the meters of this import batch;
        vendor: or those of this vendor;
        serials: or these meters (give exactly one of the three).
        wait_seconds: how long to wait for the HES's outcomes before recovering.
        workers: HSM worker processes (default: from settings).
        request: the signed request of an operator together with a security officer over the
            other parameters (`meterkeys claim` fills it in). Leave it empty here: the run then
            waits for `meterkeys approve RUN_ID`.
    """
    params = {"batch_id": batch_id, "vendor": vendor, "serials": serials,
              "wait_seconds": wait_seconds, "workers": workers}
    actor = approval.authorize_run(ACTION, params, request)
    # The HSM workers start once the run is authorized, and log in while this process checks
    # the keys and selects the meters.
    with t.open_workers(workers) as pool, t.paused_collector() as collect:
        hsm.check_keys()
        chunks = t.select_meters(batch_id, vendor, serials)
        hes = t.open_hes()
        report = t.empty_report()
        # quote(): the pool, the HES and the orders pass to the tasks as they are (Prefect
        # would otherwise walk them for futures). The chunks' id lists too: walking hundreds
        # of ids per task call for futures costs Prefect about a tenth of the claim's time.
        pool_q, hes_q = quote(pool), quote(hes)
        # The HSM workers should never wait for this process: PREPARE_AHEAD chunks have their
        # keys made while this one is settled, and a settled chunk's certificates are issued
        # (in the workers) while the next chunks go on. A chunk's keys and orders still commit
        # together, and each meter's certificates follow its proven claim. Each chunk's tasks
        # carry its place, and the workers serve earlier chunks first: the flow gets what it
        # waits for (this chunk's proofs) before the keys made ahead.
        ahead = [t.prepare_chunk.submit(pool_q, quote(c), actor, i)  # type: ignore[call-overload]
                 for i, c in enumerate(chunks[:PREPARE_AHEAD])]
        certifying = []
        for i, chunk in enumerate(chunks):
            ids = quote(chunk)
            ahead += [t.prepare_chunk.submit(pool_q, quote(c), actor, j)  # type: ignore[call-overload]
                      for j, c in enumerate(chunks[i + PREPARE_AHEAD:i + PREPARE_AHEAD + 1],
                                            start=i + PREPARE_AHEAD)]
            orders, prepared = ahead.pop(0).result()
            report.merge(prepared)
            t.submit_orders(hes_q, quote(orders), actor)  # type: ignore[call-overload]
            collected = t.collect_outcomes(  # type: ignore[call-overload]
                hes_q, quote([o.order_id for o in orders]), wait_seconds)
            report.merge(t.settle_outcomes(pool_q, quote(collected.outcomes), actor, i))  # type: ignore[call-overload]
            report.merge(t.recover_meters(pool_q, hes_q, ids, actor, i))  # type: ignore[call-overload]
            certifying.append(t.certify_meters.submit(pool_q, hes_q, ids, actor, i))  # type: ignore[call-overload]
            collect()  # the cycles this chunk left (the collector waits for this call)
        for done in certifying:
            report.merge(done.result())
        # Meters claimed by a run that stopped before certifying them.
        for chunk in t.select_uncertified(batch_id, vendor, serials):
            report.merge(t.certify_meters(pool_q, hes_q, quote(chunk), actor, len(chunks)))  # type: ignore[call-overload]
    t.finish_claim(report, actor)
    t.publish_report(report)
    return report.summary()
