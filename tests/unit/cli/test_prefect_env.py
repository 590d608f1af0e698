"""What the command line sets for Prefect before Prefect is imported."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import Settings

from cli import prefect_env

_SET = ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
        "PREFECT_LOGGING_LEVEL", prefect_env.EPHEMERAL_STARTUP_ENV)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """None of the variables ``configure`` sets, a home of its own, and the umask restored
    (``configure`` makes it private for the whole process)."""
    monkeypatch.setenv("METERKEYS_HOME", str(tmp_path / "home"))
    for name in _SET:
        monkeypatch.setenv(name, "")  # recorded, so that the test's values are undone
        monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    umask = os.umask(0o022)
    yield
    os.umask(umask)


@pytest.mark.usefixtures("clean_env")
def test_prefect_waits_long_enough_for_a_fresh_ephemeral_server() -> None:
    prefect_env.configure()
    # Read back through Prefect's own settings: the variable's name is the one Prefect reads.
    assert Settings().server.ephemeral.startup_timeout_seconds == 180


@pytest.mark.usefixtures("clean_env")
def test_an_operators_own_wait_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prefect_env.EPHEMERAL_STARTUP_ENV, "45")
    prefect_env.configure()
    assert Settings().server.ephemeral.startup_timeout_seconds == 45
