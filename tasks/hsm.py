"""Prefect tasks every process runs first: the HSM's long-lived keys checked against their pins."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lifecycle.installation import steps
from tasks import context


@task(name="check-hsm-keys", persist_result=False, cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=[1.0, 2.0], retry_condition_fn=context.retry_on_transient)
def check_keys() -> int:
    """Verify every pinned long-lived key (one object per label, pinned CKA_ID and check value,
    attributes no weaker than policy) and the module's mechanisms; return how many keys.

    The flow process then enforces the pins on every lookup, and hands them to its HSM workers,
    which verify them again themselves. A substituted or weakened key fails the run here.
    """
    pins = steps.check_keys(context.settings(), context.engine())
    get_run_logger().info("HSM keys verified against their pins: %s",
                          ", ".join(sorted(p.role for p in pins)))
    return len(pins)
