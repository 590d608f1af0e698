"""Flow-run hooks of the audit trail: every run, however it ends, closes with a checkpoint."""

from __future__ import annotations

import logging
from typing import Any

from lifecycle.errors import MeterkeysError
from lifecycle.installation import steps
from tasks import context


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
