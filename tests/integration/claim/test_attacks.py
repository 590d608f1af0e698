"""Attacks on manufacturer trust and on the claim, written as the attackers would.

Attacker 1 writes the inventory database and nothing else: every step of theirs is plain SQL.
Attacker 2 also holds the token's user PIN: their steps are plain python-pkcs11 calls. The
victim runs the claim as it always does (``lifecycle.claim.steps``); each test asserts that the
claim refuses or notices the change, and that no key comes out in clear.

A. a factory CA planted by SQL, and a meter certificate it signed: the meter is not claimed;
B. a meter's factory certificate swapped for another meter's genuine one: not claimed;
C. a settled order set pending again, and one inserted with a chosen challenge, its outcome
   replayed: no key version moves, the replays are audited;
D. the same with the invocation counter lowered: no key version moves, and the replay is
   ignored and audited, because the meter's claim is settled (an order's status is a database
   record; the meter's state decides whether an outcome is judged at all);
E. a pending GUEK planted from the factory one, and a master key planted from another meter:
   refused by the blobs' binding MACs;
F. the PIN holder unwraps the claim's new keys from their blobs to read or re-wrap them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px
from sqlalchemy import text

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.claim import steps
from lifecycle.clock import utcnow
from lifecycle.dlms import key_transfer
from lifecycle.hes.port import KeyOrder
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.hsm.templates import call_template, master_profile, usage_profile
from lifecycle.inventory import db
from lifecycle.pki import steps as pki_steps
from lifecycle.policy import KeyId
from tests.attackers import pin_holder_with_templates
from tests.identities import ROOT
from tests.integration.claim.test_claim import CLAIMED, FACTORY, key_states, meter_state

pytestmark = pytest.mark.usefixtures("prefect_server")
ACTOR = Actor("test-operator", "operator")


# --- what the victim does: the claim's own steps ------------------------------------------------
def _prepare(cf, serials: list[str]) -> tuple[HsmWorkers, list[KeyOrder], steps.Report]:  # type: ignore[no-untyped-def]
    ids = steps.select_meters(cf.engine, steps.Selection(serials=tuple(serials)))
    workers = HsmWorkers(cf.settings, 0)
    orders, report = steps.prepare_chunk(workers, cf.engine, cf.settings, ACTOR, ids, utcnow())
    return workers, orders, report


def _events(cf, action: str, serial: str) -> list[Any]:  # type: ignore[no-untyped-def]
    with db.snapshot(cf.engine) as session:
        return trail.events(session, limit=1000, action=action, meter_serial=serial)


# --- what the attacker does: plain SQL ---------------------------------------------------------
def _sql(cf, statement: str, **params: Any) -> list[Any]:  # type: ignore[no-untyped-def]
    with db.transaction(cf.engine) as session:
        result: Any = session.execute(text(statement), params)
        return list(result.all()) if result.returns_rows else []


def _meters(cf) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    rows = _sql(cf, "SELECT id, serial, system_title, suite, factory_certificate FROM meter "
                    "ORDER BY serial")
    return {r.serial: r for r in rows}


def _of_suite(cf, suite: int) -> list[Any]:  # type: ignore[no-untyped-def]
    return [m for m in _meters(cf).values() if m.suite == suite]


def _key_row(cf, meter_id: int, key_id: KeyId, state: str) -> Any:  # type: ignore[no-untyped-def]
    return _sql(cf, "SELECT id, blob, mac, kek_label FROM key_version WHERE meter_id = :m "
                    "AND key_id = :k AND state = :s", m=meter_id, k=int(key_id), s=state)[0]


def _attacker_ca(subject: x509.Name) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _meter_certificate(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                       serial: str, system_title: str) -> bytes:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, system_title)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False,
                                         False), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


# --- A, B: manufacturer trust --------------------------------------------------------------------
def test_a_a_planted_factory_ca_and_b_a_swapped_certificate_are_refused(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    cf = claim_fleet
    planted, swapped, genuine = _of_suite(cf, 1)[:3]
    # A. The attacker's CA copies the name of acme's genuine suite 1 CA, is inserted for acme,
    # and signs a certificate for the first meter's system title.
    issuer = x509.load_der_x509_certificate(base64.b64decode(planted.factory_certificate)).issuer
    ca_key, ca = _attacker_ca(issuer)
    der = ca.public_bytes(serialization.Encoding.DER)
    fingerprint = hashlib.sha256(der).hexdigest()
    naive = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    _sql(cf, "INSERT INTO vendor_ca (vendor_id, fingerprint, subject, curve, not_before, "
             "not_after, der, added_at) SELECT id, :f, :s, 'P-256', :b, :a, :d, :b FROM vendor "
             "WHERE name = 'acme'", f=fingerprint, s=ca.subject.rfc4514_string(),
         b=naive - dt.timedelta(days=1), a=naive + dt.timedelta(days=3650), d=der)
    forged = _meter_certificate(ca_key, ca, planted.serial, planted.system_title)
    _sql(cf, "UPDATE meter SET factory_certificate = :c WHERE serial = :s",
         c=base64.b64encode(forged).decode("ascii"), s=planted.serial)
    # B. The second meter gets the third's genuine certificate (right chain, wrong subject).
    _sql(cf, "UPDATE meter SET factory_certificate = :c WHERE serial = :s",
         c=genuine.factory_certificate, s=swapped.serial)

    _, orders, report = _prepare(cf, [planted.serial, swapped.serial, genuine.serial])
    assert {o.meter_serial for o in orders} == {genuine.serial}, report.failed
    reason = report.failed[planted.serial]
    assert "audit trail does not attest" in reason and fingerprint[:16] in reason, reason
    assert f"does not name system title {swapped.system_title}" in report.failed[swapped.serial]
    for meter in (planted, swapped):
        assert key_states(cf.engine, meter.serial) == {(int(k), 1): "active" for k in KeyId}
        assert [e.outcome for e in _events(cf, "claim.prepare", meter.serial)] == ["refused"]
    detail = _events(cf, "claim.prepare", planted.serial)[0].detail
    assert fingerprint[:16] in detail and fingerprint not in detail  # the trail takes a prefix
    problems = pki_steps.verify_vendor_cas(cf.engine, cf.settings)
    assert len(problems) == 1 and fingerprint[:16] in problems[0] and "acme" in problems[0]
    assert der not in pki_steps.factory_cas(cf.engine, cf.settings, "acme")



def _append_forged_event(cf, action: str, detail: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """Append an event to the audit chain as its documented rule says (SHA-256 of the previous
    hash and the canonical JSON of the fields), and move the head: plain SQL and hashlib."""
    seq, prev = _sql(cf, "SELECT seq, hash FROM audit_head WHERE id = 1")[0]
    at = dt.datetime.now(dt.UTC)
    text_detail = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    fields = {"seq": seq + 1, "at": at.isoformat(timespec="microseconds"),
              "principal": ROOT, "role": "security-officer", "action": action,
              "outcome": "ok", "meter_serial": None, "batch_id": None, "key_version_id": None,
              "flow_run_id": None, "detail": text_detail}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(prev.encode("ascii") + body.encode("utf-8")).hexdigest()
    _sql(cf, "INSERT INTO audit_event (seq, at, principal, role, action, outcome, detail, "
             "prev_hash, hash) VALUES (:q, :at, :p, 'security-officer', :a, 'ok', :d, :ph, :h)",
         q=seq + 1, at=at.replace(tzinfo=None), p=ROOT, a=action, d=text_detail, ph=prev,
         h=digest)
    _sql(cf, "UPDATE audit_head SET seq = :q, hash = :h WHERE id = 1", q=seq + 1, h=digest)


def test_a2_a_planted_factory_ca_with_a_forged_registration_event_is_refused(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    # The attacker also appends a matching vendor.add-ca event to the audit chain (after the
    # last checkpoint, the chain alone protects it) and copies a genuine row's signed
    # registration: the officers' signatures are over another certificate.
    cf = claim_fleet
    planted, genuine = _of_suite(cf, 1)[:2]
    issuer = x509.load_der_x509_certificate(base64.b64decode(planted.factory_certificate)).issuer
    ca_key, ca = _attacker_ca(issuer)
    der = ca.public_bytes(serialization.Encoding.DER)
    fingerprint = hashlib.sha256(der).hexdigest()
    naive = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    registration = _sql(cf, "SELECT registration FROM vendor_ca WHERE subject = :s",
                        s=issuer.rfc4514_string())[0][0]
    _sql(cf, "INSERT INTO vendor_ca (vendor_id, fingerprint, subject, curve, not_before, "
             "not_after, der, added_at, registration) SELECT id, :f, :s, 'P-256', :b, :a, :d, "
             ":b, :r FROM vendor WHERE name = 'acme'", f=fingerprint,
         s=ca.subject.rfc4514_string(), b=naive - dt.timedelta(days=1),
         a=naive + dt.timedelta(days=3650), d=der, r=registration)
    _append_forged_event(cf, "vendor.add-ca", {
        "vendor": "acme", "subject": ca.subject.rfc4514_string(), "curve": "P-256",
        "sha256_prefix": fingerprint[:16], "not_after": ca.not_valid_after_utc.isoformat()})
    forged = _meter_certificate(ca_key, ca, planted.serial, planted.system_title)
    _sql(cf, "UPDATE meter SET factory_certificate = :c WHERE serial = :s",
         c=base64.b64encode(forged).decode("ascii"), s=planted.serial)

    _, orders, report = _prepare(cf, [planted.serial, genuine.serial])
    assert {o.meter_serial for o in orders} == {genuine.serial}, report.failed
    reason = report.failed[planted.serial]
    assert "not the one the officers signed" in reason and fingerprint[:16] in reason, reason
    assert key_states(cf.engine, planted.serial) == {(int(k), 1): "active" for k in KeyId}
    problems = pki_steps.verify_vendor_cas(cf.engine, cf.settings)
    assert len(problems) == 1 and "not the one the officers signed" in problems[0], problems

# --- C, D: replayed outcomes ----------------------------------------------------------------------
def _claimed(cf, serial: str) -> tuple[HsmWorkers, list[Any]]:  # type: ignore[no-untyped-def]
    """Claim one meter the normal way; return the workers and the outcomes the HES gave."""
    workers, orders, report = _prepare(cf, [serial])
    assert not report.failed, report.failed
    hes = cf.hes()
    hes.submit(orders)
    outcomes = hes.outcomes()
    assert steps.settle(workers, cf.engine, cf.settings, ACTOR, outcomes,
                        utcnow()).claimed == [serial]
    assert key_states(cf.engine, serial) == CLAIMED
    return workers, outcomes


def _reopen_and_replay(cf, serial: str, workers: HsmWorkers, outcomes: list[Any],  # type: ignore[no-untyped-def]
                       attempt: int) -> tuple[steps.Report, list[str]]:
    """The attacker sets the meter's orders pending again and inserts one more order whose
    challenge is the first GUEK order's; the old outcomes come again, and the GUEK one for the
    new order too. Return the victim's report and the ids of the GUEK orders replayed."""
    meter_id = _meters(cf)[serial].id
    _sql(cf, "UPDATE claim_order SET status = 'pending', verdict = NULL, hes_status = NULL, "
             "detail = NULL, settled_at = NULL WHERE meter_id = :m", m=meter_id)
    old = _sql(cf, "SELECT order_id, key_data, challenge FROM claim_order WHERE meter_id = :m "
                   "AND kind = 'guek' AND attempt = 1", m=meter_id)[0]
    planted = f"CO-{secrets.token_hex(8).upper()}"
    _sql(cf, "INSERT INTO claim_order (order_id, meter_id, attempt, kind, key_data, challenge, "
             "status, created_at) VALUES (:o, :m, :a, 'guek', :k, :c, 'pending', :t)",
         o=planted, m=meter_id, a=attempt, k=old.key_data, c=old.challenge,
         t=dt.datetime.now(dt.UTC).replace(tzinfo=None))
    guek = next(o for o in outcomes if o.order_id == old.order_id)
    again = [*outcomes, replace(guek, order_id=planted)]
    report = steps.settle(workers, cf.engine, cf.settings, ACTOR, again, utcnow())
    return report, [old.order_id, planted]


def _outcome_of(cf, serial: str, order_id: str) -> str:  # type: ignore[no-untyped-def]
    """The newest audited outcome of an order."""
    return next(e.outcome for e in _events(cf, "claim.outcome", serial) if order_id in e.detail)


def test_c_replayed_outcomes_and_d_a_lowered_counter_move_no_key(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    cf = claim_fleet
    serial = _of_suite(cf, 0)[0].serial
    workers, outcomes = _claimed(cf, serial)
    claims_before = len(_events(cf, "meter.claim", serial))
    # C. Orders reopened and planted, outcomes replayed: the counters refuse them.
    report, replayed = _reopen_and_replay(cf, serial, workers, outcomes, attempt=2)
    assert report.claimed == [] and report.failed == {}, report
    assert {_outcome_of(cf, serial, o) for o in replayed} <= {"replayed", "ignored"}
    assert key_states(cf.engine, serial) == CLAIMED
    # D. The same with every invocation counter lowered first: audit verify names each.
    assert steps.verify_counters(cf.engine) == []
    _sql(cf, "UPDATE invocation_counter SET last_ic = 0")
    lowered = steps.verify_counters(cf.engine)
    assert lowered and all("is below" in p and "set back" in p for p in lowered), lowered
    report, replayed = _reopen_and_replay(cf, serial, workers, outcomes, attempt=3)
    assert report.claimed == []
    assert key_states(cf.engine, serial) == CLAIMED
    assert meter_state(cf.engine, serial) == "operational"
    assert len(_events(cf, "meter.claim", serial)) == claims_before
    # The meter's claim is settled: an answer to a reopened order is ignored and audited,
    # never judged (which would report a claimed meter as one that kept its factory keys).
    assert report.failed == {}, report.failed
    assert {_outcome_of(cf, serial, o) for o in replayed} == {"ignored"}


# --- E: planted key versions --------------------------------------------------------------------
def test_e_a_planted_pending_guek_or_master_key_is_refused(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    cf = claim_fleet
    liar, victim, donor = (m.serial for m in _of_suite(cf, 0)[:3])
    ids = {s: _meters(cf)[s].id for s in (liar, victim, donor)}
    # E1. The attacker makes a pending GUEK the factory one (blob and MAC) of a meter that keeps
    # its factory keys: its proof under the factory GUEK would read as a proof of the new keys.
    cf.set_modes({liar: "lie_ok"})
    workers, orders, report = _prepare(cf, [liar])
    assert not report.failed
    factory = _key_row(cf, ids[liar], KeyId.GUEK, "active")
    pending = _key_row(cf, ids[liar], KeyId.GUEK, "pending")
    _sql(cf, "UPDATE key_version SET blob = :b, mac = :m WHERE id = :i",
         b=factory.blob, m=factory.mac, i=pending.id)
    hes = cf.hes()
    hes.submit(orders)
    settled = steps.settle(workers, cf.engine, cf.settings, ACTOR, hes.outcomes(), utcnow())
    recovered = steps.recover(workers, hes, cf.engine, cf.settings, ACTOR, [ids[liar]],
                              utcnow())
    assert settled.claimed == [] and recovered.recovered == []
    assert key_states(cf.engine, liar) == FACTORY
    assert meter_state(cf.engine, liar) == "claimed"
    # Its binding MAC (made for the factory version) fails for the pending one, so the proof
    # counts for the factory GUEK only: what the meter really holds.
    verdicts = [e.detail for e in _events(cf, "claim.outcome", liar)]
    assert any('"verdict":"factory"' in d for d in verdicts), verdicts
    # The planted blob itself is on record: the factory verdict names the refused binding.
    assert any('"verdict":"factory"' in d and "blob is not bound" in d for d in verdicts), \
        verdicts

    # E2. The victim's master key becomes the donor's, a meter the attacker holds and has read
    # the master key of: the new keys would go out wrapped under a key the attacker knows.
    known_master = cf.hes().meters[donor].keys[KeyId.KEK]
    theirs = _key_row(cf, ids[donor], KeyId.KEK, "active")
    ours = _key_row(cf, ids[victim], KeyId.KEK, "active")
    _sql(cf, "UPDATE key_version SET blob = :b, mac = :m WHERE id = :i",
         b=theirs.blob, m=theirs.mac, i=ours.id)
    _, orders, report = _prepare(cf, [victim])
    for order in orders:
        for entry in key_transfer.decode(order.key_data):
            with pytest.raises(InvalidUnwrap):
                aes_key_unwrap(known_master, entry.wrapped)
    assert "not bound" in report.failed[victim], report
    assert orders == []
    assert key_states(cf.engine, victim) == {(int(k), 1): "active" for k in KeyId}
    assert [e.outcome for e in _events(cf, "claim.prepare", victim)] == ["failed"]


# --- F: the PIN holder ----------------------------------------------------------------------------
@pytest.fixture
def attacker(settings) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """A plain python-pkcs11 session with the user PIN, taught CKA_ALLOWED_MECHANISMS (a
    CK_ULONG array) to repeat meterkeys' unwrap templates exactly."""
    with pin_holder_with_templates(settings) as session:
        yield session


def _try(log: list[str], step: str, attempt: Callable[[], Any]) -> Any:
    """Run one attack step; None (and a note of the module's answer) when it is refused."""
    try:
        return attempt()
    except (px.PKCS11Error, AttributeError) as exc:
        log.append(f"{step}: {type(exc).__name__}")
        return None


def _read_or_rewrap(session: Any, kek: Any, blob: bytes, profile: dict[Any, Any],
                    log: list[str]) -> list[bytes]:
    """Every way the attacker tries to get a key out of a blob: unwrap it as readable and read
    CKA_VALUE; unwrap it with meterkeys' own template, read it, or wrap it under a key the
    attacker knows and undo that wrap. Return what came out."""
    out: list[bytes] = []
    known = secrets.token_bytes(32)
    mine = session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: known, Attribute.TOKEN: False, Attribute.WRAP: True,
        Attribute.UNWRAP: True, Attribute.EXTRACTABLE: True})
    for template in ({Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                      Attribute.EXTRACTABLE: True}, call_template(profile)):
        key = _try(log, "unwrap", partial(kek.unwrap_key, ObjectClass.SECRET_KEY, KeyType.AES,
                                          blob, mechanism=Mechanism.AES_KEY_WRAP,
                                          template=template))
        if key is None:
            continue
        value = _try(log, "read CKA_VALUE", partial(key.__getitem__, Attribute.VALUE))
        wrapped = _try(log, "wrap under a known key", partial(
            mine.wrap_key, key, mechanism=Mechanism.AES_KEY_WRAP))
        if value:
            out.append(bytes(value))
        if wrapped:
            out.append(aes_key_unwrap(known, bytes(wrapped)))
    return out


def test_f_the_pin_holder_reads_no_new_key(claim_fleet, attacker) -> None:  # type: ignore[no-untyped-def]
    cf = claim_fleet
    serial = _of_suite(cf, 0)[0].serial
    meter_id = _meters(cf)[serial].id
    _, _, report = _prepare(cf, [serial])
    assert not report.failed
    log: list[str] = []
    got: list[bytes] = []
    for key_id, profile in ((KeyId.GUEK, usage_profile()), (KeyId.KEK, master_profile())):
        row = _key_row(cf, meter_id, key_id, "pending")  # read from the inventory
        kek = attacker.get_key(object_class=ObjectClass.SECRET_KEY, label=row.kek_label)
        got += _read_or_rewrap(attacker, kek, bytes(row.blob), profile, log)
    read = len(got)  # a count: a failing assertion must not print the keys it read
    assert read == 0, "the PIN holder read a new key of the claim"
    assert any("TemplateInconsistent" in line for line in log), log
    assert any("KeyUnextractable" in line for line in log), log
    assert any("AttributeSensitive" in line for line in log), log

    # The same steps against a KEK without an unwrap template read the key: the attack works
    # where the token does not force the template.
    value = secrets.token_bytes(16)
    plain = attacker.generate_key(KeyType.AES, 256, template={
        Attribute.TOKEN: False, Attribute.WRAP: True, Attribute.UNWRAP: True})
    victim = attacker.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: value, Attribute.TOKEN: False, Attribute.EXTRACTABLE: True})
    blob = bytes(plain.wrap_key(victim, mechanism=Mechanism.AES_KEY_WRAP))
    assert any(v == value for v in _read_or_rewrap(attacker, plain, blob, usage_profile(), []))
