"""meterkeys import: run the factory-import flow from the command line, with a progress bar."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from cli.common import console, engine, err_console, flow_result, reports_errors, sign
from cli.submit import submit_import
from flows.factory_import import factory_import
from lifecycle.errors import MeterkeysError
from lifecycle.factory_import.batch_format import file_sha256
from lifecycle.identity import request
from lifecycle.identity.signers import Signer
from lifecycle.inventory import batches, vendors
from lifecycle.inventory.db import transaction


@reports_errors
def import_file(file: Path = typer.Argument(..., help="the vendor's batch data file"),
                vendor: str = typer.Option(..., help="the vendor that produced it"),
                mapping: Path | None = typer.Option(None, help="override the vendor's mapping"),
                workers: int | None = typer.Option(None, help="HSM worker processes"),
                submit: bool = typer.Option(False, "--submit",
                                            help="hand the signed request to the served "
                                                 "factory-import deployment (meterkeys serve) "
                                                 "instead of running it here; needs no PIN")
                ) -> None:
    """Import a factory batch through the factory-import flow, signed with your key."""
    if submit:
        run_id = submit_import(file.resolve(), vendor, mapping, workers)
        console.print(f"flow run {run_id} submitted to the factory-import deployment; follow "
                      "it in the Prefect UI")
        return
    summary = run_import(file, vendor, mapping, workers)
    console.print(f"{summary['imported']} meters imported, {summary['quarantined']} rows "
                  f"quarantined, of {summary['records']} ({file.name})")


def import_params(file: Path, vendor: str, mapping: Path | None,
                  workers: int | None) -> dict[str, object]:
    """The parameters of a factory-import run, as the flow signs and checks them."""
    return {"file": str(file.resolve()), "vendor": vendor,
            "mapping": str(mapping) if mapping else None, "workers": workers}


def run_import(file: Path, vendor: str, mapping: Path | None,
               workers: int | None, key: Signer | None = None) -> dict[str, object]:
    """Sign the import with the principal's key and run the flow in this process while a
    progress bar follows the batch in the inventory.

    Raises:
        MeterkeysError: the flow failed with a project error.
    """
    params = import_params(file, vendor, mapping, workers)
    signed = request.encode([sign("batch.import", params, key)])
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(file, vendor, stop), daemon=True)
    watcher.start()
    try:
        with _quiet_run_errors():
            state = factory_import(**params, request=signed,  # type: ignore[arg-type]
                                   return_state=True)
    finally:
        stop.set()
        watcher.join()
    return flow_result(state)


class _NoRunErrors(logging.Filter):
    """Keep flow- and task-run errors (with their tracebacks) off the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR
                    and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))


@contextlib.contextmanager
def _quiet_run_errors() -> Iterator[None]:
    # Prefect's run loggers send to the API (kept: the run's history shows the traceback) and
    # propagate to the root logger's console handler, which prints ~70 lines of traceback
    # before the command's own one-line error. Only the console handlers are filtered.
    handlers = list(logging.getLogger().handlers)
    quiet = _NoRunErrors()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _watch(file: Path, vendor: str, stop: threading.Event) -> None:
    sha = file_sha256(file) if file.is_file() else ""
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True,
                  disable=not err_console.is_terminal) as progress:
        task = progress.add_task(f"importing {file.name}", total=None)
        while not stop.wait(0.5):
            with transaction(engine()) as session:
                try:
                    vendor_id = vendors.get_vendor(session, vendor).id
                except MeterkeysError:
                    return
                record = batches.find_batch(session, int(vendor_id or 0), sha)
                if record is not None:
                    progress.update(task, total=record.record_count,
                                    completed=record.imported + record.quarantined)
