"""`meterkeys serve`: Prefect's own door (auth string by default) and a UI on the chosen port.

Runs the real command as a subprocess, with a home and a Prefect home of its own.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

pytestmark = pytest.mark.timeout(120)

METERKEYS = str(Path(sys.executable).parent / "meterkeys")
PREFECT_ENV = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
               "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL", "PREFECT_SERVER_API_PORT",
               "PREFECT_SERVER_API_HOST")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, auth: str | None = None, body: dict | None = None) -> tuple[int, bytes]:  # type: ignore[type-arg]
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data)  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if auth is not None:
        request.add_header("Authorization",
                           "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, b""


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int, Path, Path]]:  # type: ignore[type-arg]
    """`meterkeys serve --port N` running (server healthy), stopped afterwards."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in PREFECT_ENV}
    env["METERKEYS_HOME"] = str(tmp_path / "home")
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    out = tmp_path / "serve.log"
    with out.open("wb") as log:
        proc = subprocess.Popen([METERKEYS, "serve", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while _request(f"http://127.0.0.1:{port}/api/health")[0] != 200:
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "server not healthy in 60 s\n" + out.read_text()
            time.sleep(0.5)
        yield proc, port, tmp_path / "home", out
    finally:
        tree = {pid: _cmdline(pid) for pid in [proc.pid, *_descendants(proc.pid)]}
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        # Only what this fixture started (the command and its children), if still running.
        for pid, cmdline in tree.items():
            if cmdline and _cmdline(pid) == cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_serve_protects_the_ui_and_api_and_serves_the_ui_on_its_port(served) -> None:  # type: ignore[no-untyped-def]
    proc, port, home, out = served
    api = f"http://127.0.0.1:{port}/api"
    auth_file = home / "secrets" / "prefect-auth"

    # The auth string: generated once, kept 0600 in a 0700 folder, shown once on the console.
    assert auth_file.stat().st_mode & 0o777 == 0o600
    assert (home / "secrets").stat().st_mode & 0o777 == 0o700
    auth = auth_file.read_text(encoding="utf-8").strip()
    user, _, password = auth.partition(":")
    assert user == "admin" and len(password) >= 24
    assert out.read_text().count(auth) == 1

    # Without it the API answers 401; with it, 200; a wrong one, 401.
    assert _request(f"{api}/admin/version")[0] == 401
    assert _request(f"{api}/admin/version", auth)[0] == 200
    assert _request(f"{api}/admin/version", "admin:" + "x" * 32)[0] == 401
    assert _request(f"{api}/deployments/filter", body={})[0] == 401

    # The UI is told to ask for it, and to call the API on this port (not 4200).
    status, body = _request(f"http://127.0.0.1:{port}/ui-settings")
    assert status == 200
    ui = json.loads(body)
    assert ui["api_url"] == api
    assert ui["auth"] == "BASIC"

    # The served deployments use it: factory-import gets registered through the door.
    deadline = time.monotonic() + 40
    names: list[str] = []
    while "factory-import" not in names:
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, "factory-import not served\n" + out.read_text()
        time.sleep(0.5)
        status, body = _request(f"{api}/deployments/filter", auth, body={})
        if status == 200:
            names = [d["name"] for d in json.loads(body)]

    # The string is on no command line: neither the command's nor its server child's; the
    # server gets it from its environment.
    tree = [proc.pid, *_descendants(proc.pid)]
    assert len(tree) >= 2
    server = None
    for pid in tree:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        if b"server\0start" in cmdline:
            server = pid
            assert f"--port\0{port}".encode() in cmdline
    assert server is not None, "no `prefect server start` child"
    environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
    assert f"PREFECT_SERVER_API_AUTH_STRING={auth}".encode() in environ
    assert f"PREFECT_SERVER_UI_API_URL={api}".encode() in environ

    # Another serve against this server: refused with another string, accepted with this one.
    from cli import serve

    with pytest.raises(typer.Exit):
        serve._check_running_server(api, "admin:" + "y" * 32)
    with pytest.raises(typer.Exit):  # --no-auth against a protected server
        serve._check_running_server(api, None)
    serve._check_running_server(api, auth)


def test_the_auth_string_is_shown_only_when_created(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from cli import serve

    monkeypatch.setenv("METERKEYS_HOME", str(tmp_path / "home"))
    first = serve._auth_string()
    assert first in capsys.readouterr().out
    assert serve._auth_string() == first
    again = capsys.readouterr().out
    assert first not in again and str(serve.auth_file()) in again.replace("\n", "")

    # A file others may read is refused, never used.
    serve.auth_file().chmod(0o644)
    from lifecycle.errors import ConfigError

    with pytest.raises(ConfigError, match="open to other users"):
        serve._auth_string()


def test_no_auth_leaves_the_server_open_and_tells_the_ui_its_port() -> None:
    from cli import serve

    env = serve._server_env("127.0.0.1", 4321, "http://127.0.0.1:4321/api", None)
    assert "PREFECT_SERVER_API_AUTH_STRING" not in env
    assert "PREFECT_API_AUTH_STRING" not in env
    assert env["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["PREFECT_SERVER_API_PORT"] == "4321"
