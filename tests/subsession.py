"""A pytest session of its own, in a subprocess from the project's root: for tests about the
test session itself (what it leaves behind, the order it runs files in)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(*args: str, env: Mapping[str, str] | None = None) -> str:
    """Run ``pytest args`` in one process (no xdist, no cache); return its output.

    Raises:
        AssertionError: the session failed (its output's end says why).
    """
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-p", "no:xdist", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    return done.stdout
