"""Flow: verify the audit trail and sign its head (hourly, as the system principal)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks import approval, audit, hsm

ACTION = "audit.checkpoint"


@flow(name="audit-checkpoint", persist_result=False, on_failure=[audit.close_failed_run])
def audit_checkpoint(request: str | None = None) -> dict[str, Any]:
    """Verify the whole audit trail, then sign its head with the HSM audit key and witness it.

    The trail is verified first, so that a head is never signed over a trail that does not
    verify: a broken trail fails the run (and the verdict is audited).

    Args:
        request: the signed request of a principal allowed to checkpoint the audit trail.
            Leave it empty here: the run then waits for `meterkeys approve RUN_ID`. Runs
            created by the schedule act as the system principal.
    """
    actor = approval.authorize_run(ACTION, {}, request)
    hsm.check_keys()
    events = audit.verify_trail(actor)
    seq = audit.sign_checkpoint(actor)
    audit.publish_checkpoint(events, seq)
    return {"events": events, "checkpoint_seq": seq}
