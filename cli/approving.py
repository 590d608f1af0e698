"""meterkeys approve: the second signature a waiting piece of work needs.

Two kinds of work wait for a principal's signature: a security-officer request under dual
control (its id starts with ``R-``; ``cli.dual``), and a flow run started from a deployment's
form in the Prefect UI, paused until a principal allowed to run it approves its parameters
(``cli.approve``).
"""

from __future__ import annotations

import typer

from cli import approve as run_approval
from cli import dual
from cli.common import reports_errors

PENDING_PREFIX = "R-"


@reports_errors
def approve(item: str = typer.Argument(..., help="a pending request id (R-...) or a paused "
                                                 "flow run id"),
            yes: bool = typer.Option(False, "--yes", help="approve without asking")) -> None:
    """Show what waits for approval, sign it with your key and let it proceed."""
    if item.startswith(PENDING_PREFIX):
        dual.approve(item, lambda: yes or typer.confirm("approve and perform it?"))
        return
    run_approval.approve_run(item, yes)
