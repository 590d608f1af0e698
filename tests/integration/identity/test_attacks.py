"""Issue 11's attackers on principals, written as they would: plain SQL and plain cryptography.

The defender enrols principals with meterkeys (``tests.identities``: root SO, second SO,
operator, auditor) and authorizes signed requests. The attacker writes the inventory with plain
SQL (sqlalchemy ``text``) and signs with keys of their own through ``cryptography``, building
requests from their documented form (``lifecycle.identity.request``) with json and hashlib; one
attacker also holds the HSM's user PIN and signs with the token's audit key through
python-pkcs11. ``principals.authorize`` must refuse and name the principal, and
``principals.verify_all`` must list what was planted.

Against the code before issue 11 (a principal was a row: name, role, disabled) every one of
these succeeded: a planted row or an updated role simply was the principal, and any name could
be claimed through METERKEYS_PRINCIPAL or $USER.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_ecdsa_signature
from sqlalchemy import Engine, text

from lifecycle import pending_requests, principals
from lifecycle.clock import utcnow
from lifecycle.errors import AccessDenied, InventoryError, ReplayedRequest, RequestError
from lifecycle.identity import anchor, request
from lifecycle.identity.request import SignedRequest
from tests.attackers import pin_holder_session
from tests.identities import AUDITOR, OPERATOR, ROOT, SECOND, Identities

BACKUP = {"dest": "/backups/2025-03-01"}


# --- the attacker's tools: plain SQL, json, hashlib, cryptography ---------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(params: dict[str, Any]) -> str:
    return "sha256:" + _b64url(hashlib.sha256(_canonical(params).encode("ascii")).digest())


def _pem(private: ec.EllipticCurvePrivateKey) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _fingerprint(pem: str) -> str:
    der = serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + _b64url(hashlib.sha256(der).digest())


def _installation(engine: Engine) -> str:
    with engine.begin() as conn:
        return str(conn.execute(text("SELECT id FROM installation")).scalar_one())


def _forge(sign: Any, action: str, params: dict[str, Any], principal: str, installation: str,
           at: datetime | None = None) -> dict[str, str]:
    """A request in its documented form, signed by ``sign(message) -> DER/raw signature``."""
    fields = {"action": action, "params_digest": _digest(params), "principal": principal,
              "nonce": secrets.token_urlsafe(16), "installation": installation,
              "time": (at or datetime.now(UTC)).astimezone(UTC).isoformat(
                  timespec="microseconds")}
    message = _canonical({**fields, "purpose": "meterkeys-request/1"}).encode("ascii")
    return {**fields, "signature": _b64url(sign(message))}


def _ecdsa(private: ec.EllipticCurvePrivateKey) -> Any:
    return lambda message: private.sign(message, ec.ECDSA(hashes.SHA256()))


def _plant(engine: Engine, name: str, role: str, pem: str, enrolment: list[dict[str, str]]
           ) -> None:
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO principal (name, role, disabled, created_at, public_pem, fingerprint, "
            "enrolment) VALUES (:name, :role, :disabled, :at, :pem, :fp, :enrolment)"),
            {"name": name, "role": role, "disabled": False, "at": datetime.now(UTC),
             "pem": pem, "fp": _fingerprint(pem), "enrolment": json.dumps(enrolment)})


def _signed(entries: list[dict[str, str]]) -> list[SignedRequest]:
    # The attacker hands meterkeys JSON text, as the command line or a flow parameter would.
    return request.decode(json.dumps(entries))


def _events(engine: Engine, action: str) -> list[tuple[str, str, str]]:
    with engine.begin() as conn:
        rows = conn.execute(text("SELECT principal, outcome, detail FROM audit_event WHERE "
                                 "action = :a ORDER BY seq"), {"a": action}).all()
    return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]


def _planted_officer(ids: Identities, name: str, private: ec.EllipticCurvePrivateKey) -> None:
    """A security officer row with the attacker's key and a self-signed enrolment."""
    pem = _pem(private)
    params = {"name": name, "role": "security-officer", "public_pem": pem}
    enrolment = [_forge(_ecdsa(private), "principal.enrol", params, name,
                        _installation(ids.engine))]
    _plant(ids.engine, name, "security-officer", pem, enrolment)


# --- a database writer ----------------------------------------------------------------------------
def test_a_planted_security_officer_is_refused_and_listed(ids: Identities) -> None:
    eve = ec.generate_private_key(ec.SECP256R1())
    mallory = ec.generate_private_key(ec.SECP256R1())
    _planted_officer(ids, "eve", eve)
    _planted_officer(ids, "mallory", mallory)
    installation = _installation(ids.engine)
    requests = _signed([_forge(_ecdsa(eve), "hsm.backup", BACKUP, "eve", installation),
                        _forge(_ecdsa(mallory), "hsm.backup", BACKUP, "mallory", installation)])
    with pytest.raises(AccessDenied, match="principal 'eve': enrolment does not verify"):
        principals.authorize(ids.engine, ids.settings, requests, "hsm.backup", BACKUP,
                             at=utcnow())
    problems = principals.verify_all(ids.engine, ids.settings)
    # each is named twice: its enrolment does not verify, and the trail never enrolled it
    assert sorted({p.split(":")[0] for p in problems}) == ["principal 'eve'",
                                                           "principal 'mallory'"]
    assert "principal 'eve': no enrolment of it in the audit trail" in problems
    assert ("eve", "denied") in [(p, o) for p, o, _ in _events(ids.engine, "hsm.backup")]


def test_a_planted_officer_claiming_the_real_officers_signatures_is_refused(
        ids: Identities) -> None:
    eve = ec.generate_private_key(ec.SECP256R1())
    pem = _pem(eve)
    params = {"name": "eve", "role": "security-officer", "public_pem": pem}
    installation = _installation(ids.engine)
    forged = [_forge(_ecdsa(eve), "principal.enrol", params, who, installation)
              for who in (ROOT, SECOND)]
    _plant(ids.engine, "eve", "security-officer", pem, forged)
    forged = _signed([_forge(_ecdsa(eve), "vendor.add", {"name": "x"}, "eve", installation)])
    with pytest.raises(AccessDenied, match="principal 'eve': enrolment does not verify "
                                           r"\(.*signature does not verify"):
        principals.authorize(ids.engine, ids.settings, forged, "vendor.add", {"name": "x"},
                             at=utcnow())


def test_an_operator_made_officer_by_update_is_refused(ids: Identities) -> None:
    with ids.engine.begin() as conn:
        conn.execute(text("UPDATE principal SET role = 'security-officer' WHERE name = :n"),
                     {"n": OPERATOR})
    with pytest.raises(AccessDenied, match="principal 'test-operator': enrolment does not "
                                           r"verify \(.*parameters differ"):
        ids.authorize([OPERATOR, ROOT], "hsm.backup", BACKUP)
    # The row no longer verifies at all: not even an operator's action passes.
    with pytest.raises(AccessDenied, match="principal 'test-operator'"):
        ids.authorize([OPERATOR], "batch.import", {"file": "a.csv"})
    assert any(p.startswith("principal 'test-operator'")
               for p in principals.verify_all(ids.engine, ids.settings))


def test_a_swapped_key_is_refused(ids: Identities) -> None:
    eve = ec.generate_private_key(ec.SECP256R1())
    with ids.engine.begin() as conn:
        conn.execute(text("UPDATE principal SET public_pem = :pem, fingerprint = :fp "
                          "WHERE name = :n"),
                     {"pem": _pem(eve), "fp": _fingerprint(_pem(eve)), "n": OPERATOR})
    params = {"file": "a.csv"}
    forged = _signed([_forge(_ecdsa(eve), "batch.import", params, OPERATOR,
                              _installation(ids.engine))])
    with pytest.raises(AccessDenied, match="principal 'test-operator': enrolment does not "
                                           "verify"):
        principals.authorize(ids.engine, ids.settings, forged, "batch.import", params,
                             at=utcnow())


def test_a_disabled_principal_is_refused(ids: Identities) -> None:
    # Disabling is dual control and recorded; the row keeps the requests that did it.
    ids.authorize([AUDITOR], "audit.read", {})
    principals.disable(ids.engine, ids.settings,
                       [ids.sign(w, "principal.disable", {"name": AUDITOR}) for w in (ROOT,
                                                                                      SECOND)],
                       AUDITOR, at=utcnow())
    with pytest.raises(AccessDenied, match="the principal is disabled"):
        ids.authorize([AUDITOR], "audit.read", {})
    with ids.engine.begin() as conn:
        disabled_by = conn.execute(text("SELECT disabled_by FROM principal WHERE name = :n"),
                                   {"n": AUDITOR}).scalar_one()
    assert [r["principal"] for r in json.loads(disabled_by)] == [ROOT, SECOND]
    assert [(p, o) for p, o, _ in _events(ids.engine, "principal.disable")] == [(ROOT, "ok")]


def test_a_disabled_flag_cleared_by_sql_is_still_refused(ids: Identities) -> None:
    principals.disable(ids.engine, ids.settings,
                       [ids.sign(w, "principal.disable", {"name": AUDITOR}) for w in (ROOT,
                                                                                      SECOND)],
                       AUDITOR, at=utcnow())
    with ids.engine.begin() as conn:  # the database writer re-enables the auditor
        conn.execute(text("UPDATE principal SET disabled = :f, disabled_by = NULL "
                          "WHERE name = :n"), {"f": False, "n": AUDITOR})
    with pytest.raises(AccessDenied, match="the principal is disabled"):
        ids.authorize([AUDITOR], "audit.read", {})


# --- a network attacker: replay, other parameters, other installation, stale, future -------------
def test_a_replayed_request_is_refused_and_audited(ids: Identities) -> None:
    params = {"file": "a.csv"}
    signed = ids.sign(OPERATOR, "batch.import", params)
    principals.authorize(ids.engine, ids.settings, [signed], "batch.import", params,
                         at=utcnow())
    again = _signed([signed.to_dict()])  # the attacker copied it from a flow run's parameters
    with pytest.raises(ReplayedRequest, match="nonce already used"):
        principals.authorize(ids.engine, ids.settings, again, "batch.import", params,
                             at=utcnow())
    replayed = _events(ids.engine, "request.replayed")
    assert [(p, o) for p, o, _ in replayed] == [(OPERATOR, "denied")]
    assert "batch.import" in replayed[0][2]
    assert len(_events(ids.engine, "request.accepted")) >= 1


def test_a_request_for_other_parameters_is_refused(ids: Identities) -> None:
    signed = ids.sign(OPERATOR, "batch.import", {"file": "a.csv"})
    with pytest.raises(RequestError, match="parameters differ from what was signed"):
        principals.authorize(ids.engine, ids.settings, [signed], "batch.import",
                             {"file": "b.csv"}, at=utcnow())
    denied = _events(ids.engine, "batch.import")
    assert [(p, o) for p, o, _ in denied] == [(OPERATOR, "denied")]
    assert "parameters differ" in denied[0][2]


@pytest.mark.parametrize(("installation", "shift", "message"), [
    pytest.param("6f1c2b1e-8d3a-4c55-9a7e-0b1d2c3e4f50", timedelta(0), "installation",
                 id="other-installation"),
    pytest.param(None, timedelta(seconds=-901), "stale", id="stale"),
    pytest.param(None, timedelta(seconds=120), "in the future", id="future"),
])
def test_a_request_for_elsewhere_or_another_time_is_refused(
        ids: Identities, installation: str | None, shift: timedelta, message: str) -> None:
    # Made with the operator's real key (stolen, or the operator's own mistake).
    private = ids.signer(OPERATOR)._private
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    params = {"file": "a.csv"}
    forged = _signed([_forge(_ecdsa(private), "batch.import", params, OPERATOR,
                              installation or _installation(ids.engine),
                              datetime.now(UTC) + shift)])
    with pytest.raises(RequestError, match=message):
        principals.authorize(ids.engine, ids.settings, forged, "batch.import", params,
                             at=utcnow())


def test_a_refusal_is_audited_whatever_name_is_claimed(ids: Identities) -> None:
    # 32 hex digits look like key material to the audit trail: the denial must still be kept.
    name = "deadbeef" * 4
    eve = ec.generate_private_key(ec.SECP256R1())
    forged = _signed([_forge(_ecdsa(eve), "batch.import", {}, name, _installation(ids.engine))])
    with pytest.raises(RequestError, match="unknown principal"):
        principals.authorize(ids.engine, ids.settings, forged, "batch.import", {},
                             at=utcnow())
    assert [(p, o) for p, o, _ in _events(ids.engine, "batch.import")] == [(name, "denied")]


def test_another_action_cannot_borrow_a_signature(ids: Identities) -> None:
    signed = ids.sign(OPERATOR, "batch.import", {})
    with pytest.raises(RequestError, match="signed for 'batch.import', not 'audit.checkpoint'"):
        principals.authorize(ids.engine, ids.settings, [signed], "audit.checkpoint", {},
                             at=utcnow())


def test_a_role_may_not_exceed_its_permissions(ids: Identities) -> None:
    with pytest.raises(AccessDenied, match="role not permitted"):
        ids.authorize([AUDITOR], "batch.import", {"file": "a.csv"})


# --- dual control ---------------------------------------------------------------------------------
def test_one_officer_alone_may_not_back_up(ids: Identities) -> None:
    with pytest.raises(RequestError, match="needs two distinct security officers"):
        ids.authorize([ROOT], "hsm.backup", BACKUP)


def test_the_same_officer_twice_is_one_officer(ids: Identities) -> None:
    with pytest.raises(RequestError, match="the same principal signed twice"):
        ids.authorize([ROOT, ROOT], "hsm.backup", BACKUP)


def test_two_officers_may_back_up(ids: Identities) -> None:
    actor = ids.authorize([ROOT, SECOND], "hsm.backup", BACKUP)
    assert (actor.principal, actor.role) == (ROOT, principals.SECURITY_OFFICER)
    accepted = _events(ids.engine, "request.accepted")[-1]
    assert [r["principal"] for r in json.loads(accepted[2])["requests"]] == [ROOT, SECOND]


def test_an_officer_and_an_operator_are_not_two_officers(ids: Identities) -> None:
    with pytest.raises(AccessDenied, match="test-operator.*role not permitted"):
        ids.authorize([ROOT, OPERATOR], "hsm.backup", BACKUP)


def test_a_pending_request_completed_by_a_second_officer(ids: Identities) -> None:
    request_id = pending_requests.submit(ids.engine, ids.settings,
                                         ids.sign(ROOT, "hsm.backup", BACKUP), "hsm.backup",
                                         BACKUP, at=utcnow())
    assert request_id.startswith("R-") and len(request_id) == 10
    assert pending_requests.get_pending(ids.engine, request_id).status == "pending"
    actor, done = pending_requests.complete(ids.engine, ids.settings, request_id,
                                            ids.sign(SECOND, "hsm.backup", BACKUP), at=utcnow())
    assert (actor.principal, done.status, done.params) == (ROOT, "done", BACKUP)
    assert [s.request.principal for s in done.requests] == [ROOT, SECOND]
    assert pending_requests.get_pending(ids.engine, request_id).status == "done"
    with pytest.raises(InventoryError, match="is done, not pending"):
        pending_requests.complete(ids.engine, ids.settings, request_id,
                                  ids.sign(SECOND, "hsm.backup", BACKUP), at=utcnow())


def test_a_pending_request_completed_by_the_same_officer_is_refused(ids: Identities) -> None:
    request_id = pending_requests.submit(ids.engine, ids.settings,
                                         ids.sign(ROOT, "hsm.backup", BACKUP), "hsm.backup",
                                         BACKUP, at=utcnow())
    with pytest.raises(RequestError, match="signed this pending request already"):
        pending_requests.complete(ids.engine, ids.settings, request_id,
                                  ids.sign(ROOT, "hsm.backup", BACKUP), at=utcnow())
    assert pending_requests.get_pending(ids.engine, request_id).status == "pending"


def test_pending_parameters_edited_by_sql_are_refused(ids: Identities) -> None:
    request_id = pending_requests.submit(ids.engine, ids.settings,
                                         ids.sign(ROOT, "hsm.backup", BACKUP), "hsm.backup",
                                         BACKUP, at=utcnow())
    evil = {"dest": "/tmp/attacker"}  # noqa: S108 - the attacker's choice
    with ids.engine.begin() as conn:
        conn.execute(text("UPDATE pending_request SET params = :p WHERE id = :id"),
                     {"p": json.dumps(evil), "id": request_id})
    # The second officer is shown the edited parameters and signs them: still refused, since
    # the first signature covers the original ones.
    with pytest.raises(RequestError, match="parameters differ from what was signed"):
        pending_requests.complete(ids.engine, ids.settings, request_id,
                                  ids.sign(SECOND, "hsm.backup", evil), at=utcnow())
    assert pending_requests.get_pending(ids.engine, request_id).status == "pending"


def test_enrolment_through_a_pending_request(ids: Identities) -> None:
    pem = ids.keygen("olga").public_key_pem()
    params = principals.enrolment_params("olga", principals.OPERATOR, pem)
    request_id = pending_requests.submit(ids.engine, ids.settings,
                                         ids.sign(ROOT, "principal.enrol", params),
                                         "principal.enrol", params, at=utcnow())
    pending_requests.complete(ids.engine, ids.settings, request_id,
                              ids.sign(SECOND, "principal.enrol", params), at=utcnow())
    assert ids.authorize(["olga"], "batch.import", {}).principal == "olga"
    assert principals.verify_all(ids.engine, ids.settings) == []


def test_the_root_enrols_only_one_second_officer_alone(ids: Identities) -> None:
    before = anchor.path_of(ids.settings.witness_path).read_text()
    with pytest.raises(RequestError, match="needs two distinct security officers"):
        ids.enrol("sam", principals.SECURITY_OFFICER, by=[ROOT])
    assert anchor.path_of(ids.settings.witness_path).read_text() == before
    ids.enrol("sam", principals.SECURITY_OFFICER)  # with both officers
    assert principals.verify_all(ids.engine, ids.settings) == []


def test_one_key_one_principal(ids: Identities) -> None:
    pem = ids.signer(OPERATOR).public_key_pem()
    params = principals.enrolment_params("olga", principals.OPERATOR, pem)
    with pytest.raises(InventoryError, match="already enrolled for principal 'test-operator'"):
        principals.enrol(ids.engine, ids.settings,
                         [ids.sign(w, "principal.enrol", params) for w in (ROOT, SECOND)],
                         "olga", principals.OPERATOR, pem, at=utcnow())


def test_the_root_is_enrolled_once(ids: Identities) -> None:
    pem = ids.keygen("usurper").public_key_pem()
    params = principals.enrolment_params("usurper", principals.SECURITY_OFFICER, pem)
    with pytest.raises(InventoryError, match="principals exist already"):
        principals.enrol_root(ids.engine, ids.settings,
                              ids.sign("usurper", "principal.enrol", params), pem, at=utcnow())


def test_the_last_enabled_officer_is_not_disabled(ids: Identities) -> None:
    principals.disable(ids.engine, ids.settings,
                       [ids.sign(w, "principal.disable", {"name": SECOND}) for w in (ROOT,
                                                                                     SECOND)],
                       SECOND, at=utcnow())
    with pytest.raises(RequestError, match="needs two distinct security officers"):
        principals.disable(ids.engine, ids.settings,
                           [ids.sign(ROOT, "principal.disable", {"name": ROOT})], ROOT,
                           at=utcnow())


def test_the_principal_is_the_key_not_a_name(ids: Identities) -> None:
    # What replaced METERKEYS_PRINCIPAL: the signer's key names the principal.
    assert principals.signer_name(ids.engine, ids.signer(OPERATOR).public_key_pem()) == OPERATOR
    stranger = _pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(RequestError, match="no enrolled principal holds this key"):
        principals.signer_name(ids.engine, stranger)
    signed = principals.sign(ids.engine, ids.signer(AUDITOR), "audit.read", {}, at=utcnow())
    assert signed.request.principal == AUDITOR


# --- a PIN holder: uses the HSM freely, holds no principal's private key --------------------------
@pytest.fixture
def pin_holder(ids: Identities) -> Iterator[Any]:
    """A plain python-pkcs11 session on the token, logged in with the user PIN."""
    with pin_holder_session(ids.settings) as session:
        yield session


def test_a_pin_holder_cannot_make_a_principal_with_the_hsm_key(ids: Identities,
                                                                pin_holder: Any) -> None:
    label = ids.settings.audit_key_label
    private = pin_holder.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    public = pin_holder.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
    hsm_pem = serialization.load_der_public_key(encode_ec_public_key(public)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def hsm_sign(message: bytes) -> bytes:
        digest = hashlib.sha256(message).digest()
        return bytes(encode_ecdsa_signature(private.sign(digest, mechanism=Mechanism.ECDSA)))

    installation = _installation(ids.engine)
    params = {"name": "hsm-so", "role": "security-officer", "public_pem": hsm_pem}
    _plant(ids.engine, "hsm-so", "security-officer", hsm_pem,
           [_forge(hsm_sign, "principal.enrol", params, "hsm-so", installation)])
    # ... and an operator "enrolled" by that officer and the real root's name.
    eve = ec.generate_private_key(ec.SECP256R1())
    eve_params = {"name": "eve", "role": "operator", "public_pem": _pem(eve)}
    _plant(ids.engine, "eve", "operator", _pem(eve),
           [_forge(hsm_sign, "principal.enrol", eve_params, "hsm-so", installation),
            _forge(hsm_sign, "principal.enrol", eve_params, ROOT, installation)])
    forged = _signed([_forge(_ecdsa(eve), "batch.import", {}, "eve", installation)])
    with pytest.raises(AccessDenied, match="principal 'eve': enrolment does not verify"):
        principals.authorize(ids.engine, ids.settings, forged, "batch.import", {},
                             at=utcnow())
    forged = _signed([_forge(hsm_sign, "hsm.backup", BACKUP, "hsm-so", installation),
                       ids.sign(ROOT, "hsm.backup", BACKUP).to_dict()])
    with pytest.raises(AccessDenied, match="principal 'hsm-so': enrolment does not verify"):
        principals.authorize(ids.engine, ids.settings, forged, "hsm.backup", BACKUP,
                             at=utcnow())
    listed = principals.verify_all(ids.engine, ids.settings)
    assert sorted({p.split(":")[0] for p in listed}) == ["principal 'eve'", "principal 'hsm-so'"]


def test_no_anchor_no_principal(ids: Identities) -> None:
    # An inventory pointed at a witness folder without the anchor trusts nobody.
    elsewhere = ids.settings.model_copy(update={"witness_dir": ids.key_dir / "empty"})
    with pytest.raises(AccessDenied, match="no principal anchor"):
        principals.authorize(ids.engine, elsewhere, [ids.sign(OPERATOR, "batch.import", {})],
                             "batch.import", {}, at=utcnow())
