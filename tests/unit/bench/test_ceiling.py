"""The benchmarks' check that an HSM ceiling was measured on cores of its own (figures of
2026-11-30 claims: a disturbed 2-process ceiling and two steady ones)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import ceiling  # noqa: E402 - the benchmarks' folder is no package


@pytest.mark.parametrize(("one", "many", "steady"), [
    (479.0, 762.0, False),   # 1.59 times: the run that measured a ratio of 0.63
    (445.0, 777.0, False),   # 1.75 times: the same run, after its claim
    (536.0, 1040.0, True),   # 1.94 times
    (496.0, 1012.0, True),   # 2.04 times
])
def test_a_ceiling_that_did_not_scale_is_not_steady(one: float, many: float, steady: bool,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert ceiling.steady(one, many, 2) is steady
    warned = capsys.readouterr().err
    assert ("warning: the 2-process HSM ceiling ran" in warned) is (not steady)


def test_one_process_is_always_steady() -> None:
    assert ceiling.scaling(500.0, 500.0, 1) == 1.0
    assert ceiling.steady(500.0, 100.0, 1)


def test_the_json_fields_carry_the_scaling_and_the_verdict(capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    assert ceiling.fields(479.0, 762.0, 2) == {"ceiling_scaling": 0.795, "ceiling_steady": False}
    assert "warning" in capsys.readouterr().err
    assert ceiling.fields(496.0, 1012.0, 2) == {"ceiling_scaling": 1.02, "ceiling_steady": True}
