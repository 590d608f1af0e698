"""Flow: issue the CRLs that are due and publish the PKI (daily, as the system principal)."""

from __future__ import annotations

from prefect import flow

from tasks import approval, audit, hsm, pki

ACTION = "pki.crl"


@flow(name="publish-crls", persist_result=False, on_failure=[audit.close_failed_run])
def publish_crls(request: str | None = None) -> dict[str, int]:
    """Issue the next CRL of every online CA generation whose newest CRL is missing or past
    half its validity, then export the CA certificates and CRLs to the publishing folder.

    Args:
        request: the signed request of a principal allowed to issue CRLs. Leave it empty
            here: the run then waits for `meterkeys approve RUN_ID`. Runs created by the
            schedule act as the system principal.
    """
    actor = approval.authorize_run(ACTION, {}, request)
    hsm.check_keys()
    issued = pki.issue_due_crls(actor)
    files = pki.publish(actor)
    return {"crls_issued": issued, "files": files}
