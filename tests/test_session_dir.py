"""The test session leaves nothing behind: its directory (a SoftHSM2 token, PIN files,
principals' keys, inventories) is removed when the session's process ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.subsession import run_pytest

ONE_TEST = "tests/unit/claim/test_rules.py::test_plan_keys_refuses_a_torn_inventory"


def _session(tmp_path: Path, keep: bool) -> list[str]:
    """Run one quick test in a pytest session of its own; return what it left in TMPDIR."""
    env = {k: v for k, v in os.environ.items() if k != "METERKEYS_TEST_KEEP_DIR"}
    env["TMPDIR"] = str(tmp_path)
    if keep:
        env["METERKEYS_TEST_KEEP_DIR"] = "1"
    run_pytest("-q", ONE_TEST, env=env)
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("meterkeys-test-"))


@pytest.mark.parametrize("keep", [False, True])
def test_the_session_directory_goes_with_the_session_unless_kept(tmp_path: Path,
                                                                 keep: bool) -> None:
    left = _session(tmp_path, keep)
    assert len(left) == (1 if keep else 0), left
