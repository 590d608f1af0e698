"""Identity decisions as scenario tables: freshness, matching, dual control, enrolment chains."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from lifecycle.errors import RequestError
from lifecycle.identity import keys, request, rules
from lifecycle.identity.anchor import Anchor
from lifecycle.identity.request import SignedRequest
from lifecycle.identity.rules import Record
from lifecycle.identity.signers import FileSigner

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
INST = "inst-1"
SIGNERS = {name: FileSigner(ec.generate_private_key(ec.SECP256R1()))
           for name in ("root", "second", "third", "eve")}
SIGNERS["ed"] = FileSigner(ed25519.Ed25519PrivateKey.generate())


def _signed(who: str, action: str = "hsm.backup", params: dict[str, str] | None = None,
            at: datetime = T0, installation: str = INST, as_name: str | None = None
            ) -> SignedRequest:
    return request.make(action, params or {}, as_name or who, installation, at, SIGNERS[who])


DIGEST = request.params_digest({})

MATCH = [
    pytest.param([], "no signed request", id="none"),
    pytest.param([_signed("root", action="hsm.restore")], "signed for 'hsm.restore'",
                 id="other-action"),
    pytest.param([_signed("root", params={"dest": "x"})], "parameters differ", id="params"),
    pytest.param([_signed("root", installation="inst-2")], "installation inst-2",
                 id="installation"),
    pytest.param([_signed("root"), _signed("root")], "signed twice", id="same-principal"),
]


@pytest.mark.parametrize(("requests", "message"), MATCH)
def test_check_matches(requests: list[SignedRequest], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        rules.check_matches(requests, "hsm.backup", DIGEST, INST)


def test_check_matches_refuses_a_shared_nonce() -> None:
    a = _signed("root")
    b = dataclasses.replace(_signed("second"), request=dataclasses.replace(
        _signed("second").request, nonce=a.request.nonce))
    with pytest.raises(RequestError, match="same nonce"):
        rules.check_matches([a, b], "hsm.backup", DIGEST, INST)
    rules.check_matches([a, _signed("second")], "hsm.backup", DIGEST, INST)


FRESH = [
    pytest.param([T0], T0, None, id="now"),
    pytest.param([T0], T0 + timedelta(seconds=900), None, id="max-age-exactly"),
    pytest.param([T0], T0 + timedelta(seconds=901), "stale", id="stale"),
    pytest.param([T0 + timedelta(seconds=60)], T0, None, id="skew-allowed"),
    pytest.param([T0 + timedelta(seconds=61)], T0, "in the future", id="future"),
    pytest.param([T0 - timedelta(hours=23), T0], T0, None, id="first-in-window"),
    pytest.param([T0 - timedelta(hours=25), T0], T0, "more than 86400 s ago",
                 id="first-outside-window"),
    pytest.param([T0 - timedelta(hours=2), T0 - timedelta(hours=1)], T0, "stale",
                 id="newest-stale"),
]


@pytest.mark.parametrize(("times", "at", "message"), FRESH)
def test_check_fresh(times: list[datetime], at: datetime, message: str | None) -> None:
    requests = [_signed(w, at=t) for w, t in zip(("root", "second"), times, strict=False)]
    if message is None:
        rules.check_fresh(requests, at, 900, 86400)
    else:
        with pytest.raises(RequestError, match=message):
            rules.check_fresh(requests, at, 900, 86400)


SO, OP = rules.SECURITY_OFFICER, "operator"
DUAL = [
    pytest.param({"a": SO, "b": SO}, False, True, id="two-officers"),
    pytest.param({"a": SO}, False, False, id="one-officer"),
    pytest.param({"a": SO, "b": OP}, False, False, id="officer-and-operator"),
    pytest.param({"a": SO}, True, True, id="root-alone-for-the-second"),
    pytest.param({"a": OP}, True, False, id="operator-never"),
]


@pytest.mark.parametrize(("roles", "single_ok", "ok"), DUAL)
def test_check_dual_control(roles: dict[str, str], single_ok: bool, ok: bool) -> None:
    if ok:
        rules.check_dual_control(roles, "hsm.backup", single_ok=single_ok)
    else:
        with pytest.raises(RequestError, match="two distinct security officers"):
            rules.check_dual_control(roles, "hsm.backup", single_ok=single_ok)


# --- enrolment chains over in-memory rows --------------------------------------------------------
def _record(name: str, role: str, by: list[str], key: str | None = None,
            installation: str = INST) -> Record:
    pem = keys.normalize_pem(SIGNERS[key or name].public_key_pem(), "k")
    params = rules.enrolment_params(name, role, pem)
    signed = [_signed(w, rules.ENROL, params, installation=installation) for w in by]
    return Record(name, role, pem, keys.fingerprint(pem), request.encode(signed))


def _fleet() -> dict[str, Record]:
    return {"root": _record("root", SO, ["root"]),
            "second": _record("second", SO, ["root"]),
            "ed": _record("ed", OP, ["root", "second"])}


ANCHOR = Anchor(INST, "root", keys.fingerprint(SIGNERS["root"].public_key_pem()),
                "second", keys.fingerprint(SIGNERS["second"].public_key_pem()))


def _verify(rows: dict[str, Record], name: str, anchor: Anchor | None = ANCHOR) -> Record:
    return rules.verify_enrolment(name, rows.get, anchor, INST)


def test_a_proper_fleet_verifies() -> None:
    rows = _fleet()
    for name in rows:
        assert _verify(rows, name) == rows[name]


def _planted_self_signed(rows: dict[str, Record]) -> None:
    rows["eve"] = _record("eve", SO, ["eve"])


def _role_changed(rows: dict[str, Record]) -> None:
    rows["ed"] = dataclasses.replace(rows["ed"], role=SO)


def _key_swapped(rows: dict[str, Record]) -> None:
    pem = keys.normalize_pem(SIGNERS["eve"].public_key_pem(), "k")
    rows["ed"] = dataclasses.replace(rows["ed"], public_pem=pem, fingerprint=keys.fingerprint(pem))


def _fingerprint_only(rows: dict[str, Record]) -> None:
    rows["ed"] = dataclasses.replace(rows["ed"], fingerprint=rows["root"].fingerprint)


def _one_officer(rows: dict[str, Record]) -> None:
    rows["third"] = _record("third", OP, ["root"])


def _operator_signs(rows: dict[str, Record]) -> None:
    rows["third"] = _record("third", OP, ["root", "ed"])


def _forged_by_officers(rows: dict[str, Record]) -> None:
    # eve signs in the officers' names with her own key.
    pem = keys.normalize_pem(SIGNERS["third"].public_key_pem(), "k")
    params = rules.enrolment_params("third", SO, pem)
    forged = [_signed("eve", rules.ENROL, params, as_name=n) for n in ("root", "second")]
    rows["third"] = Record("third", SO, pem, keys.fingerprint(pem), request.encode(forged))


def _second_not_anchored(rows: dict[str, Record]) -> None:
    rows["third"] = _record("third", SO, ["root"])


def _other_installation(rows: dict[str, Record]) -> None:
    rows["third"] = _record("third", OP, ["root", "second"], installation="inst-2")


def _cycle(rows: dict[str, Record]) -> None:
    # Two planted officers that enrolled each other.
    rows["eve"] = _record("eve", SO, ["third", "root"])
    rows["third"] = _record("third", SO, ["eve", "root"])


def _no_enrolment(rows: dict[str, Record]) -> None:
    rows["ed"] = dataclasses.replace(rows["ed"], enrolment=None)


def _root_replaced(rows: dict[str, Record]) -> None:
    rows["root"] = _record("root", SO, ["eve"], key="eve")


CHAINS = [
    pytest.param(_planted_self_signed, "eve", "signed by itself", id="planted-self-signed"),
    pytest.param(_role_changed, "ed", "parameters differ", id="role-changed"),
    pytest.param(_key_swapped, "ed", "parameters differ", id="key-swapped"),
    pytest.param(_fingerprint_only, "ed", "fingerprint is not the key's", id="fingerprint"),
    pytest.param(_one_officer, "third", "two security officers are needed", id="one-officer"),
    pytest.param(_operator_signs, "third", "'ed' is not a security officer", id="operator"),
    pytest.param(_forged_by_officers, "third", "signature does not verify", id="forged"),
    pytest.param(_second_not_anchored, "third", "two security officers", id="not-anchored"),
    pytest.param(_other_installation, "third", "installation inst-2", id="other-installation"),
    pytest.param(_cycle, "eve", "enrolment cycle", id="cycle"),
    pytest.param(_no_enrolment, "ed", "no key or no enrolment", id="no-enrolment"),
    pytest.param(_root_replaced, "ed", "not the anchored, self-signed", id="root-replaced"),
]


@pytest.mark.parametrize(("attack", "name", "message"), CHAINS)
def test_an_enrolment_that_does_not_hold_is_refused(attack, name: str, message: str) -> None:  # type: ignore[no-untyped-def]
    rows = _fleet()
    attack(rows)
    with pytest.raises(RequestError, match=f"principal '{name}': enrolment does not verify"
                                           f" \\(.*{message}"):
        _verify(rows, name)


def test_no_anchor_or_another_installations_anchor_verifies_nothing() -> None:
    rows = _fleet()
    with pytest.raises(RequestError, match="no principal anchor"):
        _verify(rows, "root", None)
    with pytest.raises(RequestError, match="anchor belongs to installation inst-2"):
        _verify(rows, "ed", dataclasses.replace(ANCHOR, installation="inst-2"))


def test_the_depth_is_limited() -> None:
    rows = {"root": _record("root", SO, ["root"]), "second": _record("second", SO, ["root"])}
    names = [f"so{i}" for i in range(rules.MAX_DEPTH + 2)]
    previous = "second"
    for name in names:
        SIGNERS.setdefault(name, FileSigner(ec.generate_private_key(ec.SECP256R1())))
        rows[name] = _record(name, SO, ["root", previous])
        previous = name
    with pytest.raises(RequestError, match="deeper than"):
        _verify(rows, names[-1])
    assert _verify(rows, names[2]).name == names[2]
