"""Shared pieces of the command line: settings, engine, the principal's key, output, errors.

Who acts is proven, never declared: every state-changing command signs its request with the
principal's private key (``METERKEYS_PRINCIPAL_KEY``: a PEM file, or a key on a PKCS#11 smart
card) and the process that acts checks the signature against the key enrolled for that
principal (``lifecycle.principals.authorize``). Commands that only read state sign nothing; what
they may read is the database account's business (read-only for an operator's machine).
"""

from __future__ import annotations

import functools
import getpass
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import typer
from rich.console import Console

from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.errors import MeterkeysError
from lifecycle.identity import signers
from lifecycle.identity.request import SignedRequest
from lifecycle.identity.signers import Signer
from lifecycle.inventory.db import Engine
from tasks import context

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def settings() -> Settings:
    """Read the settings once per command (the same cache the tasks use)."""
    return context.settings()


def engine() -> Engine:
    """Open the inventory once per command and bring its schema up to date."""
    return context.engine()


@functools.cache
def signer() -> Signer:
    """The principal's key, as configured; asks for its passphrase on a terminal if needed.

    Raises:
        ConfigError: no key configured, or it cannot be read.
    """
    s = settings()
    passphrase = None
    if _needs_passphrase(s):
        passphrase = getpass.getpass(f"passphrase of {s.principal_key}: ").encode()
    return signers.from_settings(s, passphrase)


def _needs_passphrase(s: Settings) -> bool:
    key = s.principal_key
    if not key or key.startswith("pkcs11:") or s.principal_key_passphrase_file is not None:
        return False
    try:
        with open(key, encoding="ascii", errors="replace") as fh:
            encrypted = "ENCRYPTED" in fh.readline()
    except OSError:
        return False
    return encrypted and sys.stdin.isatty()


def sign(action: str, params: Mapping[str, Any], key: Signer | None = None) -> SignedRequest:
    """Sign a request for ``action`` over ``params`` with the principal's key.

    Raises:
        ConfigError: no key configured.
        AccessDenied: no enrolled principal holds the key.
    """
    return principals.sign(engine(), key or signer(), action, params, at=utcnow())


def authorize(action: str, params: Mapping[str, Any] | None = None,
              key: Signer | None = None) -> Actor:
    """Sign a request for ``action`` and have it checked, as the acting process does.

    Raises:
        AccessDenied: the signature, the principal, its role or the request is refused
            (the refusal is audited).
    """
    values = dict(params or {})
    request = sign(action, values, key)
    return principals.authorize(engine(), settings(), [request], action, values, at=utcnow())


def flow_result(state: Any) -> dict[str, Any]:
    """Return a finished flow run's result; a project error is raised as itself, anything else
    is shown as the flow's one-line message (no traceback) and exits 1.

    Raises:
        MeterkeysError: the flow failed with a project error.
    """
    if state.is_completed():
        return dict(state.result())
    try:
        state.result()
    except MeterkeysError:
        raise
    except Exception as exc:  # noqa: BLE001 - show the flow's own message, no traceback
        err_console.print(f"[bold red]flow failed:[/] {exc}")
    raise typer.Exit(1)


def fail(exc: MeterkeysError, code: int = 1) -> typer.Exit:
    """Print a project error (never a traceback) and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)  # one line, any width
    return typer.Exit(code)


def reports_errors(command: F) -> F:
    """Turn a project error raised by a command into its one-line message and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MeterkeysError as exc:
            raise fail(exc) from None

    return wrapper  # type: ignore[return-value]
