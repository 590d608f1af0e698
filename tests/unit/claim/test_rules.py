"""The claim's rules as scenario tables: key plans, verdicts on answers, confirmation moves."""

from __future__ import annotations

import pytest

from lifecycle.claim import rules
from lifecycle.claim.rules import Evidence, KeyView, MeterView, OrderKind, Verdict
from lifecycle.errors import ClaimError

ALL = range(4)


def meter(states: dict[int, str], *, extra: tuple[KeyView, ...] = (),
          state: str = "registered") -> MeterView:
    keys = tuple(KeyView(k, v, s) for v, s in states.items() for k in ALL)
    return MeterView("M1", state, 0, keys + extra)


@pytest.mark.parametrize(("view", "make", "version"), [
    pytest.param(meter({1: "active"}), True, 2, id="factory-only-makes-version-2"),
    pytest.param(meter({1: "active", 2: "pending"}, state="claimed"), False, 2,
                 id="pending-exist-are-re-sent-never-new"),
    pytest.param(meter({1: "destroyed", 2: "active"}), True, 3, id="next-version-after-all"),
])
def test_plan_keys(view: MeterView, make: bool, version: int) -> None:
    plan = rules.plan_keys(view)
    assert (plan.make, plan.new_version) == (make, version)


@pytest.mark.parametrize("view", [
    pytest.param(meter({1: "pending"}), id="no-active-version"),
    pytest.param(meter({1: "active"}, extra=(KeyView(0, 2, "active"),)), id="two-active"),
    pytest.param(meter({1: "active"}, extra=(KeyView(0, 2, "pending"), KeyView(0, 3, "pending"))),
                 id="two-pending-of-one-key"),
    pytest.param(meter({1: "active"}, extra=(KeyView(0, 2, "pending"),)), id="torn-pending-set"),
])
def test_plan_keys_refuses_a_torn_inventory(view: MeterView) -> None:
    with pytest.raises(ClaimError):
        rules.plan_keys(view)


@pytest.mark.parametrize(("state", "refused"), [
    ("registered", False), ("claimed", False), ("operational", True), ("removed", True)])
def test_refusal_by_meter_state(state: str, refused: bool) -> None:
    assert (rules.refusal(meter({1: "active"}, state=state)) is not None) == refused


P, A, N = Evidence.PENDING, Evidence.ACTIVE, Evidence.NONE
G, M = OrderKind.GUEK, OrderKind.MASTER


@pytest.mark.parametrize(("kind", "status", "evidence", "last", "counter", "verdict"), [
    pytest.param(G, "pending", P, None, 1, Verdict.CONFIRM, id="proof-under-new-guek"),
    pytest.param(M, "pending", P, None, 1, Verdict.CONFIRM, id="master-order-proven-new"),
    pytest.param(G, "pending", A, 4, 5, Verdict.FACTORY, id="lie-ok-proves-factory-guek"),
    pytest.param(G, "pending", N, None, None, Verdict.UNPROVEN, id="no-proof-recover"),
    pytest.param(M, "pending", A, None, 3, Verdict.DELIVERED, id="master-order-delivered"),
    pytest.param(M, "pending", N, None, None, Verdict.DELIVERED, id="master-order-no-proof"),
    pytest.param(None, None, P, None, 1, Verdict.IGNORED, id="unknown-order"),
    pytest.param(G, "answered", P, None, 1, Verdict.IGNORED, id="already-settled"),
    pytest.param(G, "superseded", P, None, 1, Verdict.IGNORED, id="superseded-order"),
    pytest.param(G, "pending", P, 7, 7, Verdict.REPLAYED, id="counter-equal-to-last"),
    pytest.param(G, "pending", P, 7, 3, Verdict.REPLAYED, id="counter-below-last"),
    pytest.param(G, "pending", P, 7, 8, Verdict.CONFIRM, id="counter-above-last"),
])
def test_judge(kind: OrderKind | None, status: str | None, evidence: Evidence,
               last: int | None, counter: int | None, verdict: Verdict) -> None:
    assert rules.judge(kind, status, evidence, last, counter) == verdict


@pytest.mark.parametrize(("kind", "evidence"), [
    pytest.param(G, P, id="guek-order-proven-new"), pytest.param(G, A, id="guek-order-active"),
    pytest.param(M, N, id="master-order-no-proof")])
def test_an_outcome_for_a_meter_out_of_claim_is_ignored(kind: OrderKind,
                                                        evidence: Evidence) -> None:
    # An order set back to pending by SQL, for a meter already operational (or registered).
    assert rules.judge(kind, "pending", evidence, None, 9, in_claim=False) == Verdict.IGNORED


@pytest.mark.parametrize(("evidence", "verdict"), [
    (P, Verdict.CONFIRM), (A, Verdict.FACTORY), (N, Verdict.UNPROVEN)])
def test_recovery_tries_pending_then_active(evidence: Evidence, verdict: Verdict) -> None:
    assert rules.recovered(evidence) == verdict


def test_confirm_activates_pending_and_destroys_factory_after_retiring() -> None:
    view = meter({1: "active", 2: "pending"}, state="claimed")
    moves = rules.confirm(view)
    assert [m.to for m in moves if m.version == 1] == ["retired", "destroyed"] * 4
    final = rules.last_moves(moves)
    assert final == {(k, 1): "destroyed" for k in ALL} | {(k, 2): "active" for k in ALL}


def test_confirm_refuses_nothing_pending() -> None:
    with pytest.raises(ClaimError):
        rules.confirm(meter({1: "active"}))


def test_the_master_comes_last_in_its_order_and_the_guek_under_the_new_master() -> None:
    assert rules.TRANSFER_KEYS[M][-1] == 3
    assert rules.TRANSFER_KEYS[G] == (0,)
    assert sorted(k for ks in rules.TRANSFER_KEYS.values() for k in ks) == list(ALL)
