"""Prefect tasks of the ownership claim: thin, chunk-level wrappers over its steps.

No task returns or persists key material: every task has ``persist_result=False`` and no cache
policy; orders (wrapped keys and challenges) pass between tasks in memory only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import hes_adapters
from lifecycle import heap
from lifecycle.audit.chain import Actor
from lifecycle.claim import certification, steps
from lifecycle.hes.port import Hes, KeyOrder, OneAtATime, Outcome
from lifecycle.hsm.pool import HsmWorkers
from tasks import context

RETRY_DELAYS = [1.0, 2.0, 4.0]


def open_hes() -> Hes:
    """The HES of this process's settings (``hes``: file:<dir> or simulated:<dir>), called one
    call at a time (the claim's tasks run in threads)."""
    return OneAtATime(hes_adapters.open_hes(context.settings()))


def paused_collector() -> AbstractContextManager[Callable[[], int]]:
    """Pause the garbage collector for the run; the call it gives collects between chunks
    (``lifecycle.heap``: the automatic collections cost more than the claim's own Python)."""
    return heap.paused()


def empty_report() -> steps.Report:
    """A run's report, empty (the flow merges each chunk's into it)."""
    return steps.Report()


def open_workers(workers: int | None) -> HsmWorkers:
    """Start the HSM worker processes of a run (``None``: as many as settings say)."""
    settings = context.settings()
    return HsmWorkers(settings, settings.workers if workers is None else workers)


@task(name="select-meters", persist_result=False, cache_policy=NO_CACHE)
def select_meters(batch_id: int | None, vendor: str | None,
                  serials: list[str] | None) -> list[list[int]]:
    """Select the meters to claim (registered or in claim), in chunks of ``claim_chunk_size``."""
    selection = steps.Selection(batch_id, vendor, tuple(serials or ()))
    ids = steps.select_meters(context.engine(), selection)
    get_run_logger().info("%d meters to claim", len(ids))
    return steps.chunked(ids, context.settings().claim_chunk_size)


@task(name="prepare-chunk", persist_result=False, cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=context.retry_on_transient)
def prepare_chunk(workers: HsmWorkers, meter_ids: list[int], actor: Actor,
                  chunk: int = 0) -> tuple[list[KeyOrder], steps.Report]:
    """Make (or find) a chunk's pending keys in the HSM and commit its orders (``chunk``: its
    place in the run; the HSM workers serve lower places first)."""
    with workers.ranked(chunk):
        return steps.prepare_chunk(workers, context.engine(), context.settings(), actor,
                                   meter_ids, context.now())


@task(name="submit-orders", persist_result=False, cache_policy=NO_CACHE)
def submit_orders(hes: Hes, orders: list[KeyOrder], actor: Actor) -> None:
    """Hand a chunk's orders to the HES."""
    steps.submit(hes, context.engine(), actor, orders, context.now())


@dataclass(frozen=True)
class Collected:
    """A chunk's outcomes, returned by a task as one value.

    For as long as the flow run lasts, Prefect links each task's result and each of its direct
    elements to the task run (dependency tracking: a dictionary entry, a tuple and a weak
    reference each). Returned as a list, a claim's outcomes left two such links a meter
    behind (half a kilobyte a meter in the flow's process, and more for each collection
    between chunks to walk); wrapped, a chunk leaves two.
    """

    outcomes: tuple[Outcome, ...]


@task(name="collect-outcomes", persist_result=False, cache_policy=NO_CACHE)
def collect_outcomes(hes: Hes, order_ids: list[str], wait_seconds: float) -> Collected:
    """Gather the HES's outcomes until each order has one or the wait is over."""
    return Collected(tuple(steps.collect(hes, set(order_ids), wait_seconds)))


@task(name="settle-outcomes", persist_result=False, cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=context.retry_on_transient)
def settle_outcomes(workers: HsmWorkers, outcomes: Sequence[Outcome], actor: Actor,
                    chunk: int = 0) -> steps.Report:
    """Check the outcomes' proofs in the HSM and commit what they prove."""
    with workers.ranked(chunk):
        return steps.settle(workers, context.engine(), context.settings(), actor, outcomes,
                            context.now())


@task(name="recover-meters", persist_result=False, cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=context.retry_on_transient)
def recover_meters(workers: HsmWorkers, hes: Hes, meter_ids: list[int], actor: Actor,
                   chunk: int = 0) -> steps.Report:
    """Ask the meters still in claim to prove the GUEK they hold, and settle them by it."""
    with workers.ranked(chunk):
        return steps.recover(workers, hes, context.engine(), context.settings(), actor,
                             meter_ids, context.now())


@task(name="select-uncertified", persist_result=False, cache_policy=NO_CACHE)
def select_uncertified(batch_id: int | None, vendor: str | None,
                       serials: list[str] | None) -> list[list[int]]:
    """Select the claimed suite 1/2 meters whose certificates were never delivered, in chunks
    of ``certify_chunk_size``."""
    selection = steps.Selection(batch_id, vendor, tuple(serials or ()))
    ids = certification.select_uncertified(context.engine(), selection)
    get_run_logger().info("%d claimed meters to certify", len(ids))
    return steps.chunked(ids, context.settings().certify_chunk_size)


@task(name="certify-meters", persist_result=False, cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=context.retry_on_transient)
def certify_meters(workers: HsmWorkers, hes: Hes, meter_ids: list[int], actor: Actor,
                   chunk: int = 0) -> steps.Report:
    """Check the meters' certificate requests, issue their certificates in the HSM, record
    them and hand them to the HES."""
    with workers.ranked(chunk):
        return certification.certify(workers, hes, context.engine(), context.settings(),
                                     actor, meter_ids, context.now())


@task(name="finish-claim", persist_result=False, cache_policy=NO_CACHE)
def finish_claim(report: steps.Report, actor: Actor) -> None:
    """Audit the run's totals and sign an audit checkpoint."""
    steps.finish(context.engine(), context.settings(), actor, report, context.now())


@task(name="publish-claim-report", persist_result=False, cache_policy=NO_CACHE)
def publish_report(report: steps.Report) -> None:
    """Publish claimed / failed / waiting / recovered as markdown tables (no key material)."""
    parts = ["# Ownership claim", "",
             f"{len(report.claimed)} claimed, {len(report.recovered)} recovered, "
             f"{len(report.failed)} failed, {len(report.waiting)} waiting; "
             f"{len(report.certified)} certified, {len(report.uncertified)} without "
             "certificates.", ""]
    parts += _table("Claimed", [(s, "proven under the new GUEK") for s in report.claimed])
    parts += _table("Recovered", [(s, "proven on recovery") for s in report.recovered])
    parts += _table("Failed", sorted(report.failed.items()))
    parts += _table("Waiting", sorted(report.waiting.items()))
    parts += _table("Certified", [(s, "signature and key-agreement certificates delivered")
                                  for s in report.certified])
    parts += _table("Claimed, certificates refused", sorted(report.uncertified.items()))
    create_markdown_artifact(markdown="\n".join(parts), key="ownership-claim",
                             description="Ownership claim: how each meter ended")


def _table(title: str, rows: list[tuple[str, str]], limit: int = 2000) -> list[str]:
    if not rows:
        return []
    out = [f"## {title} ({len(rows)})", "", "| meter | reason |", "|---|---|"]
    out += [f"| {serial} | {reason.replace('|', '/')} |" for serial, reason in rows[:limit]]
    if len(rows) > limit:
        out.append(f"| … | {len(rows) - limit} more |")
    return [*out, ""]
