"""Prefect tasks of the PKI: thin wrappers over ``lifecycle.pki.steps`` that return counts."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lifecycle.audit.chain import Actor
from lifecycle.pki import steps
from tasks import context


@task(name="issue-due-crls", persist_result=False, cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=[1.0, 2.0], retry_condition_fn=context.retry_on_transient)
def issue_due_crls(actor: Actor) -> int:
    """Issue the CRLs that are due (each audited); return how many."""
    made = steps.issue_due_crls(context.settings(), context.engine(), actor, context.now())
    for crl in made:
        get_run_logger().info("CRL %d of %s generation %d: %d revoked", crl.number,
                              crl.ca_name, crl.generation, crl.revoked)
        if crl.only_in_trail:
            get_run_logger().warning("%d revocation(s) of %s generation %d were missing from "
                                     "the inventory: listed from the audit trail",
                                     crl.only_in_trail, crl.ca_name, crl.generation)
    return len(made)


@task(name="publish-pki", persist_result=False, cache_policy=NO_CACHE)
def publish(actor: Actor) -> int:
    """Export the CA certificates and newest CRLs to the publishing folder; return the count."""
    files = steps.publish(context.settings(), context.engine(), actor, context.now())
    get_run_logger().info("%d files published to %s", len(files),
                          context.settings().publish_path)
    return len(files)
