"""Deployments as code: what `meterkeys serve` offers in the Prefect UI.

A run started from a deployment's form carries no signed request: it waits, paused, until a
principal allowed to perform its action signs its parameters with `meterkeys approve RUN_ID`.
Runs created by a schedule act as the system principal (tasks/approval.py).
"""

from __future__ import annotations

from typing import Any

from flows.audit_checkpoint import audit_checkpoint
from flows.factory_import import factory_import
from flows.ownership_claim import ownership_claim
from flows.pki_crl import publish_crls

FACTORY_IMPORT = "factory-import"
AUDIT_CHECKPOINT = "audit-checkpoint"
OWNERSHIP_CLAIM = "ownership-claim"
CHECKPOINT_EVERY_SECONDS = 3600
PUBLISH_CRLS = "publish-crls"
PUBLISH_CRLS_CRON = "17 3 * * *"  # daily; a CRL is due at half its validity (7 days)
_APPROVE = ("A run started here waits for `meterkeys approve RUN_ID` by a principal allowed "
            "to {action} (leave `request` empty).")


def deployments() -> list[Any]:
    """Return the deployments of meterkeys (one per lifecycle process built so far)."""
    return [
        factory_import.to_deployment(
            name=FACTORY_IMPORT,
            description="Verify a manufacturer's factory batch and take its meters' keys "
                        "into HSM custody. Parameters: the batch data file (its manifest lies "
                        "beside it), the vendor, an optional mapping file and the HSM workers. "
                        + _APPROVE.format(action="import batches"),
            tags=["meterkeys", "import"],
            concurrency_limit=2,
        ),
        ownership_claim.to_deployment(
            name=OWNERSHIP_CLAIM,
            description="Take registered meters over from their manufacturer: the DSO's keys "
                        "generated in the HSM, sent through the HES, proven by each meter, the "
                        "factory keys destroyed. Parameters: one of batch_id, vendor or serials "
                        "(a list), how long to wait for outcomes, the HSM workers. "
                        + _APPROVE.format(action="claim meters"),
            tags=["meterkeys", "claim"],
            concurrency_limit=1,
        ),
        audit_checkpoint.to_deployment(
            name=AUDIT_CHECKPOINT,
            description="Verify the audit trail and sign its head with the HSM audit key, "
                        "every hour as the system principal. "
                        + _APPROVE.format(action="checkpoint the trail"),
            tags=["meterkeys", "audit"],
            interval=CHECKPOINT_EVERY_SECONDS,
            concurrency_limit=1,
        ),
        publish_crls.to_deployment(
            name=PUBLISH_CRLS,
            description="Issue the CRLs that are due (none yet, or past half their validity) "
                        "and export the CA certificates and CRLs to the publishing folder, "
                        "daily as the system principal. "
                        + _APPROVE.format(action="issue CRLs"),
            tags=["meterkeys", "pki"],
            cron=PUBLISH_CRLS_CRON,
            concurrency_limit=1,
        ),
    ]


def main() -> None:
    """Serve every deployment from this process until interrupted."""
    import prefect

    prefect.serve(*deployments(), limit=4)


if __name__ == "__main__":
    main()
