"""What a ceremony makes: scenario table over the CAs' states and the clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lifecycle import policy
from lifecycle.errors import PkiError
from lifecycle.pki import profiles, rules
from lifecycle.pki.rules import CaState

NOW = datetime(2027, 1, 1, tzinfo=UTC)
ALL = {name: CaState(name, 1, NOW - timedelta(days=30)) for name in profiles.CAS}


def _with(**changes: CaState | None) -> dict[str, CaState | None]:
    return {**ALL, **{k.replace("_", "-"): v for k, v in changes.items()}}


@pytest.mark.parametrize(("current", "renew", "now", "expected"), [
    pytest.param({}, [], NOW, {n: 1 for n in profiles.CAS}, id="first-ceremony-makes-all"),
    pytest.param(ALL, [], NOW, {}, id="nothing-due"),
    pytest.param(ALL, ["device-p256"], NOW, {"device-p256": 2}, id="renew-on-request"),
    pytest.param(_with(maintenance=None), [], NOW, {"maintenance": 1}, id="a-missing-ca"),
    pytest.param(ALL, [], NOW + policy.CA_ISSUING_PERIOD,
                 {n: 2 for n in profiles.ONLINE}, id="issuing-period-over"),
    pytest.param(_with(device_p384=CaState("device-p384", 3, NOW)), ["device-p384"], NOW,
                 {"device-p384": 4}, id="renew-the-newest-generation"),
])
def test_ceremony_plan(current, renew, now, expected) -> None:  # type: ignore[no-untyped-def]
    assert rules.ceremony_plan(current, renew, now) == expected


@pytest.mark.parametrize("renew", [["root"], ["device-p521"]])
def test_ceremony_refuses_to_renew(renew: list[str]) -> None:
    with pytest.raises(PkiError):
        rules.ceremony_plan(ALL, renew, NOW)


def test_crl_numbers_increase() -> None:
    assert rules.next_crl_number(None) == 1
    assert rules.next_crl_number(41) == 42
