"""meterkeys approve RUN_ID: sign the parameters of a paused flow run and let it proceed.

A run started from a deployment's form in the Prefect UI holds no signed request: it pauses
(``tasks.approval``) until a principal allowed to perform its action signs its parameters. This
command reads the run's parameters back from the Prefect API, shows them, signs them with the
principal's key over the flow's action and resumes the run with the signed request as its input.
The run then checks the request against its OWN parameters: an approval cannot be moved to a
run whose parameters differ.
"""

from __future__ import annotations

import inspect
import json
from typing import Any
from uuid import UUID

import typer
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound, ParameterTypeError
from prefect.flow_runs import resume_flow_run
from rich.table import Table
from rich.text import Text

from cli.common import console, sign
from flows import APPROVALS
from lifecycle.errors import RequestError
from lifecycle.identity import request as signed_request

REQUEST_PARAMETER = "request"


def approve_run(run_id: str, yes: bool) -> None:
    """Show a paused flow run's parameters, sign them with the principal's key and resume it.

    Raises:
        RequestError: no such run, it is not paused, or its flow takes no approval.
        ConfigError: no principal key configured.
        AccessDenied: no enrolled principal holds the key.
        typer.Exit: the approval was declined at the prompt.
    """
    where = f"flow run {run_id}"
    run, flow_name = _paused_run(run_id, where)
    if flow_name not in APPROVALS:
        raise RequestError(where, f"its flow {flow_name!r} takes no approval (known: "
                                  f"{', '.join(sorted(APPROVALS))})")
    flow, action = APPROVALS[flow_name]
    params = approval_params(flow, run.parameters, where)
    _show(run, flow_name, action, params)
    if not yes and not typer.confirm(f"sign {action} over these parameters with your key?"):
        console.print("not approved: the run stays paused")
        raise typer.Exit(1)
    signed = sign(action, params)
    try:
        resume_flow_run(run.id, run_input={REQUEST_PARAMETER: signed_request.encode([signed])})
    except (NotPausedError, FlowPauseTimeout, RuntimeError) as exc:
        raise RequestError(where, f"could not be resumed: {exc}") from None
    console.print(f"{where} resumed with the approval of {signed.request.principal}: it checks "
                  "the signature against its own parameters, then proceeds")


def approval_params(flow: Any, parameters: dict[str, Any], where: str) -> dict[str, Any]:
    """Return the parameters a flow's run signs and checks: all but ``request``, coerced as the
    flow's run coerces them, with the flow's defaults for absent ones.

    Raises:
        RequestError: the parameters do not fit the flow.
    """
    given = {k: v for k, v in parameters.items() if k != REQUEST_PARAMETER}
    try:
        values = flow.validate_parameters(given)
    except ParameterTypeError as exc:
        raise RequestError(where, f"its parameters do not fit the flow: {exc}") from None
    return {name: values.get(name, p.default)
            for name, p in inspect.signature(flow.fn).parameters.items()
            if name != REQUEST_PARAMETER}


def _paused_run(run_id: str, where: str) -> tuple[FlowRun, str]:
    try:
        uuid = UUID(run_id)
    except ValueError:
        raise RequestError(where, "not a flow run id (nor a pending request id R-...)") from None
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(uuid)
        except ObjectNotFound:
            raise RequestError(where, "no such flow run in the Prefect API") from None
        flow_name = client.read_flow(run.flow_id).name
    if run.state is None or not run.state.is_paused():
        state = run.state.name if run.state is not None else "without a state"
        raise RequestError(where, f"is {state}, not Paused: it waits for no approval")
    return run, flow_name


def _show(run: FlowRun, flow_name: str, action: str, params: dict[str, Any]) -> None:
    # Values as the JSON that is signed (ASCII, control characters escaped) and as plain text,
    # never as console markup: the approver must see exactly what the signature covers.
    table = Table(title=Text(f"flow run {run.id} of {flow_name}: approve {action}?"),
                  caption=None if params else "(the flow takes no parameters)")
    table.add_column("parameter")
    table.add_column("value (as signed)", overflow="fold")
    for name, value in params.items():
        table.add_row(Text(name), Text(json.dumps(value, ensure_ascii=True)))
    console.print(table)
