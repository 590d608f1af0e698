"""meterkeys claim: run the ownership-claim flow from the command line (or --submit it)."""

from __future__ import annotations

from typing import Any, cast

import typer
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from cli.common import console, flow_result, reports_errors, sign
from deployments.serve import OWNERSHIP_CLAIM
from flows.ownership_claim import ACTION, ownership_claim
from lifecycle.errors import ConfigError
from lifecycle.identity import request
from lifecycle.identity.signers import Signer


@reports_errors
def claim(batch: int | None = typer.Option(None, "--batch", help="claim an import batch's "
                                                                  "meters"),
          vendor: str | None = typer.Option(None, help="claim a vendor's meters"),
          serial: list[str] = typer.Option([], "--serial", help="claim this meter (repeat)"),
          wait: float = typer.Option(30.0, help="seconds to wait for the HES's outcomes"),
          workers: int | None = typer.Option(None, help="HSM worker processes"),
          submit: bool = typer.Option(False, "--submit", help="hand the signed request to the "
                                      "served ownership-claim deployment instead")) -> None:
    """Take meters over from their manufacturer, signed with your key (action meter.claim)."""
    params = claim_params(batch, vendor, serial, wait, workers)
    if submit:
        signed = request.encode([sign(ACTION, params)])
        run = cast(FlowRun, run_deployment(f"{ownership_claim.name}/{OWNERSHIP_CLAIM}",
                                           parameters={**params, "request": signed}, timeout=0))
        console.print(f"flow run {run.id} submitted to the ownership-claim deployment")
        return
    result = run_claim(params)
    console.print(f"{len(result['claimed'])} claimed, {len(result['recovered'])} recovered, "
                  f"{len(result['failed'])} failed, {len(result['waiting'])} waiting")
    for serial_no, reason in {**result["failed"], **result["waiting"]}.items():
        console.print(f"  {serial_no}: {reason}")


def claim_params(batch: int | None, vendor: str | None, serials: list[str], wait: float,
                 workers: int | None) -> dict[str, Any]:
    """The parameters of an ownership-claim run, as the flow signs and checks them.

    Raises:
        ConfigError: none or several of batch, vendor and serials.
    """
    if sum((batch is not None, vendor is not None, bool(serials))) != 1:
        raise ConfigError("give exactly one of --batch, --vendor or --serial")
    return {"batch_id": batch, "vendor": vendor, "serials": list(serials) or None,
            "wait_seconds": wait, "workers": workers}


def run_claim(params: dict[str, Any], key: Signer | None = None) -> dict[str, Any]:
    """Sign the claim with the principal's key and run the flow in this process.

    Raises:
        MeterkeysError: the flow failed with a project error.
    """
    signed = request.encode([sign(ACTION, params, key)])
    state = ownership_claim(**params, request=signed, return_state=True)
    return flow_result(state)
