"""meterkeys serve: a local Prefect server with the meterkeys deployments.

Prefect's own door: the server's UI and API are protected by Prefect's basic-auth string by
default. The string is generated once, kept in ``<home>/secrets/prefect-auth`` (mode 0600) and
shown on the console only when it is created; it reaches the server and the served deployments
through their environment and settings, never through a command line.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import typer
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from cli.common import console, err_console, fail
from cli.demo import MARKER as DEMO_MARKER
from deployments.serve import main
from lifecycle.config import ensure_private_dir, ensure_private_home, load_settings
from lifecycle.errors import ConfigError

AUTH_USER = "admin"
AUTH_FILE = "prefect-auth"
# Prefect settings this command sets for its server child and for the client side.
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
SERVER_HOST_ENV = "PREFECT_SERVER_API_HOST"
SERVER_PORT_ENV = "PREFECT_SERVER_API_PORT"
UI_API_URL_ENV = "PREFECT_SERVER_UI_API_URL"
_AUTH_ENVS = (SERVER_AUTH_ENV, CLIENT_AUTH_ENV, "PREFECT_UI_API_URL")


def serve(host: str = typer.Option("127.0.0.1", help="address of the Prefect UI and API"),
          port: int = typer.Option(4200, help="port of the Prefect UI and API"),
          auth: bool = typer.Option(True, "--auth/--no-auth",
                                    help="protect the UI and API with Prefect's auth string "
                                         "(kept in <home>/secrets/prefect-auth)")) -> None:
    """Start a local Prefect server (UI at http://HOST:PORT) and serve the deployments."""
    url_host = _url_host(host)
    base = f"http://{url_host}:{port}"
    api = f"{base}/api"
    try:
        auth_string = _auth_string() if auth else None
    except ConfigError as exc:
        raise fail(exc) from None
    if auth_string is None:
        err_console.print("[bold yellow]warning:[/] --no-auth: the Prefect UI and API at "
                          f"{base} accept anyone who can reach {host}:{port}; they can start "
                          "and cancel runs and read their parameters and logs.")
    elif not _loopback(host):
        err_console.print(f"[bold yellow]warning:[/] {host} is not a loopback address: the auth "
                          "string travels in clear (plain HTTP); put TLS in front of the server.")
    server = None
    if _healthy(api):
        _check_running_server(api, auth_string)
    else:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
             str(port), "--analytics-off"], env=_server_env(host, port, api, auth_string))
        deadline = time.monotonic() + 120
        while not _healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                _stop(server)
                err_console.print(f"[bold red]error:[/] the Prefect server did not start on "
                                  f"{host}:{port}")
                raise typer.Exit(1)
            time.sleep(1)
    _hes_for_claims()
    console.print(f"Prefect UI: {base}  (deployments: factory-import, ownership-claim, "
                  "audit-checkpoint hourly, publish-crls daily); Ctrl-C to stop")
    try:
        with temporary_settings(updates={PREFECT_API_URL: api,
                                         PREFECT_API_AUTH_STRING: auth_string}):
            main()
    finally:
        if server is not None:
            _stop(server)


def _hes_for_claims() -> None:
    """Tell the served claim runs which HES to use: the setting's, or in a demo home its
    simulated HES; warn when there is none (a claim run would fail at its start)."""
    settings = load_settings()
    if settings.hes is not None:
        return
    folder = settings.simulation_dir / "hes"
    if (settings.home / DEMO_MARKER).is_file() and folder.is_dir():
        os.environ["METERKEYS_HES"] = f"simulated:{folder}"
        console.print(f"claims go to the demo's simulated HES in {folder}")
        return
    err_console.print("[bold yellow]warning:[/] no HES configured: ownership-claim runs fail "
                      "until METERKEYS_HES is set (file:<dir> or simulated:<dir>).")


def auth_file() -> Path:
    """Where the Prefect auth string of this home is kept."""
    return load_settings().secrets_dir / AUTH_FILE


def _auth_string() -> str:
    """Return the auth string of this home, generating it (and showing it once) if absent.

    Raises:
        ConfigError: the home or the secrets folder is not private, or the file is shared,
            not ours, or malformed.
    """
    settings = load_settings()
    ensure_private_home(settings)
    ensure_private_dir(settings.secrets_dir, "secrets folder")
    path = settings.secrets_dir / AUTH_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return _read_auth_file(path)
    value = f"{AUTH_USER}:{secrets.token_urlsafe(24)}"
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value + "\n")
    console.print(f"[bold]Prefect UI auth string[/] (shown once; kept in {path}, mode 0600):",
                  soft_wrap=True)
    console.print(f"    {value}", markup=False, highlight=False)
    console.print("The UI asks for it on first visit; the served deployments use it already.")
    return value


def _read_auth_file(path: Path) -> str:
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o077:
        raise ConfigError(f"{path} is open to other users (mode {info.st_mode & 0o777:04o}); "
                          f"make it private: chmod 600 {path}")
    value = path.read_text(encoding="utf-8").strip()
    user, sep, password = value.partition(":")
    if not sep or not user or len(password) < 16:
        raise ConfigError(f"{path} does not hold a usable auth string (USER:PASSWORD, password "
                          "of 16 characters or more); remove it to generate a new one")
    console.print(f"Prefect UI auth string: in {path}", soft_wrap=True)
    return value


def _server_env(host: str, port: int, api: str, auth_string: str | None) -> dict[str, str]:
    """The server child's environment: where the UI finds the API, and the auth string."""
    env = {k: v for k, v in os.environ.items() if k not in _AUTH_ENVS}
    # `prefect server start --port` does not tell the UI: it derives its API URL from these
    # settings (or PREFECT_API_URL), so set them all from host and port.
    env[SERVER_HOST_ENV] = host
    env[SERVER_PORT_ENV] = str(port)
    env[UI_API_URL_ENV] = api
    env["PREFECT_API_URL"] = api
    if auth_string is not None:
        env[SERVER_AUTH_ENV] = auth_string
        env[CLIENT_AUTH_ENV] = auth_string
    return env


def _check_running_server(api: str, auth_string: str | None) -> None:
    """A server already answers on this port: use it only if it has this home's door.

    Raises:
        typer.Exit: it refuses this home's auth string, or it is open while auth is asked for.
    """
    if auth_string is None:
        if _status(api, None) == 401:
            err_console.print(f"[bold red]error:[/] the Prefect server at {api} asks for an auth "
                              "string; serve without --no-auth, or choose another --port")
            raise typer.Exit(1)
        return
    if _status(api, None) != 401:
        err_console.print(f"[bold red]error:[/] a Prefect server without an auth string already "
                          f"runs at {api}; stop it, choose another --port, or pass --no-auth")
        raise typer.Exit(1)
    if _status(api, auth_string) != 200:
        err_console.print(f"[bold red]error:[/] the Prefect server at {api} refuses this home's "
                          f"auth string ({auth_file()}); stop it or choose another --port")
        raise typer.Exit(1)


def _status(api: str, auth_string: str | None) -> int:
    request = urllib.request.Request(f"{api}/admin/version")  # noqa: S310
    if auth_string is not None:
        token = base64.b64encode(auth_string.encode("utf-8")).decode("ascii")
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _stop(server: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def _url_host(host: str) -> str:
    """The host as a URL names it: a wildcard address is reached on loopback."""
    if host in ("0.0.0.0", ""):  # noqa: S104
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False
