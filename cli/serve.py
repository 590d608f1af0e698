"""meterkeys serve: a local Prefect server with the meterkeys deployments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import typer
from prefect.settings import PREFECT_API_URL, temporary_settings

from cli.common import console
from deployments.serve import main


def serve(host: str = typer.Option("127.0.0.1", help="address of the Prefect UI and API"),
          port: int = typer.Option(4200, help="port of the Prefect UI and API")) -> None:
    """Start a local Prefect server (UI at http://HOST:PORT) and serve the deployments."""
    api = f"http://{host}:{port}/api"
    server = None
    if not _healthy(api):
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
             str(port), "--analytics-off"], env=dict(os.environ))
        deadline = time.monotonic() + 120
        while not _healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                raise typer.Exit(1)
            time.sleep(1)
    console.print(f"Prefect UI: http://{host}:{port}  (deployments: factory-import); "
                  "Ctrl-C to stop")
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            main()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False
