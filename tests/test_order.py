"""The test files run in the order ``tests/conftest.py`` gives them: the leak scans first, then
the slow files, then the rest; and ``make test`` keeps that order across its processes."""

from __future__ import annotations

import shlex

from tests.subsession import ROOT, run_pytest

LEAK_SCANS = ["tests/integration/secrets/test_no_secrets.py",
              "tests/integration/secrets/test_claim_secrets.py"]
KILL_TESTS = {"tests/integration/claim/test_kill.py",
              "tests/integration/factory_import/test_kill.py"}


def _collect(*args: str) -> list[str]:
    """The test ids pytest collects, in its order."""
    return [line for line in run_pytest("--collect-only", "-q", *args).splitlines()
            if "::" in line]


def _files(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(i.split("::")[0] for i in ids))


def test_leak_scans_then_slow_files_come_first() -> None:
    files = _files(_collect("tests"))
    slow = set(_files(_collect("tests", "-m", "slow")))
    assert files[:2] == LEAK_SCANS, files[:4]
    assert slow >= KILL_TESTS, sorted(slow)
    after_scans = files[2:]
    # every slow file before the first file without a slow test
    assert set(after_scans[:len(slow)]) == slow, after_scans[:len(slow) + 2]


def test_make_test_keeps_the_order_across_processes() -> None:
    """pytest-xdist hands out whole files in the collected order only with
    ``--no-loadscope-reorder``: by default it re-sorts them by number of tests, which started
    the leak scans and both kill tests last."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("test:")))
    recipe = next(line for line in lines[start + 1:] if "pytest" in line)
    words = shlex.split(recipe)
    assert words[words.index("--dist") + 1] == "loadfile", recipe
    assert "--no-loadscope-reorder" in words, recipe
