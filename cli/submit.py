"""meterkeys import --submit: hand a signed import to the served factory-import deployment.

The command signs the import's parameters with the principal's key and creates a run of the
deployment (``meterkeys serve``) with the signed request as its ``request`` parameter; the run
checks it against its own parameters before it does anything. This process opens no HSM
session and needs no PIN. The signed request is not secret (it is a Prefect parameter).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from cli.common import sign
from deployments.serve import FACTORY_IMPORT
from flows.factory_import import ACTION, factory_import
from lifecycle.identity import request as signed_request


def submit_import(file: Path | str, vendor: str, mapping: Path | str | None,
                  workers: int | None) -> str:
    """Sign the import and create a run of the factory-import deployment; return the run id.

    Paths are made absolute: the run executes in the serving process, elsewhere.

    Raises:
        ConfigError: no principal key configured.
        AccessDenied: no enrolled principal holds the key.
    """
    params = {"file": str(Path(file).resolve()), "vendor": vendor,
              "mapping": str(Path(mapping).resolve()) if mapping else None, "workers": workers}
    signed = sign(ACTION, params)
    run = cast(FlowRun, run_deployment(  # called from sync code: the FlowRun, not a coroutine
        f"{factory_import.name}/{FACTORY_IMPORT}",
        parameters={**params, "request": signed_request.encode([signed])}, timeout=0))
    return str(run.id)
