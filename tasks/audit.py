"""Prefect tasks and hooks of the audit trail: verify it, sign its head, close failed runs.

Every run, however it ends, closes with a checkpoint: a completed run signs its head in its last
task (the factory import's ``finish-batch``, the audit checkpoint's ``sign-checkpoint``), a
failed one in ``close_failed_run``.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lifecycle.audit.chain import Actor
from lifecycle.errors import AuditError, MeterkeysError
from lifecycle.installation import steps
from tasks import context


@task(name="verify-trail", persist_result=False, cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=[1.0, 2.0], retry_condition_fn=context.retry_on_transient)
def verify_trail(actor: Actor) -> int:
    """Verify every event, the head and every checkpoint against the pinned audit key and the
    witness; audit the verdict; return the number of events verified.

    Raises:
        AuditError: the trail is broken (the verdict is audited first, when it can be).
    """
    engine = context.engine()
    try:
        count = steps.verify_trail(context.settings(), engine)
    except AuditError as exc:
        steps.note_verification(engine, actor, "failed", {"seq": exc.seq, "reason": exc.reason},
                                context.now())
        raise
    steps.note_verification(engine, actor, "ok", {"events": count}, context.now())
    get_run_logger().info("audit trail intact: %d events verified", count)
    return count


@task(name="sign-checkpoint", persist_result=False, cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=[1.0, 2.0], retry_condition_fn=context.retry_on_transient)
def sign_checkpoint(actor: Actor) -> int | None:
    """Sign the head with the HSM audit key and hand it to the witness; return the sequence
    number signed (None: the trail is empty)."""
    made = steps.sign_checkpoint(context.settings(), context.engine(), actor, context.now())
    return None if made is None else made.seq


@task(name="publish-checkpoint", persist_result=False, cache_policy=NO_CACHE)
def publish_checkpoint(events: int, seq: int | None) -> None:
    """Publish what the run verified and signed as a markdown artifact."""
    signed = "nothing to sign" if seq is None else f"head signed at event {seq}"
    create_markdown_artifact(
        markdown=(f"# Audit checkpoint\n\n{events} events verified against the pinned audit "
                  f"key and the witness; {signed} by the HSM audit key and witnessed."),
        key="audit-checkpoint", description="Audit trail verified and its head signed")


def close_failed_run(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_failure`` hook: sign and witness the head the failed run left.

    A completed run signs its head in its last task; a failed one would otherwise leave its
    events (a rejection, a refusal) unsigned until the next run. A failure to sign here is
    logged, not raised: the run has failed already, and the next checkpoint covers the events.
    """
    try:
        steps.close_run(context.settings(), context.engine(), context.now())
    except MeterkeysError as exc:
        logging.getLogger("meterkeys.audit").warning(
            "could not close the failed run %s with a checkpoint: %s", flow_run.id, exc)
