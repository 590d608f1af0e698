"""Attacks on the PKI, written as the attacker would: plain SQL on the inventory (a database
writer) and plain python-pkcs11 with the online token's user PIN (a PIN holder).

meterkeys' API only plays the victim's legitimate acts (the ceremony, issuing, revoking).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from sqlalchemy import text

from lifecycle.clock import utcnow
from lifecycle.errors import PkiError
from lifecycle.pki import ceremony, profiles, signing, steps
from lifecycle.pki.issuing import DeviceRequest
from tests.attackers import pin_holder_session

from .conftest import Pki

P256 = profiles.DEVICE_P256


def _issue(pki: Pki, titles: list[str]) -> list[Any]:
    requests = [DeviceRequest(t, ec.generate_private_key(ec.SECP256R1()).public_key()
                              .public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo),
                              profiles.SIGNATURE) for t in titles]
    return steps.issue(pki.fleet.settings, pki.fleet.engine, pki.actor, P256, requests,  # type: ignore[attr-defined]
                       utcnow())


def _sql(pki: Pki, statement: str, **params: Any) -> list[Any]:
    with pki.fleet.engine.begin() as conn:  # type: ignore[attr-defined]
        result = conn.execute(text(statement), params)
        return list(result.all()) if result.returns_rows else []


def _attacker_cert(subject: x509.Name, issuer: x509.Name, public: Any, signer: Any,
                   serial: int, ca: bool = True) -> bytes:
    now = utcnow()
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public).serial_number(serial)
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=900))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA384())).public_bytes(serialization.Encoding.DER)


def _stored(pki: Pki) -> dict[str, x509.Certificate]:
    return {name: x509.load_der_x509_certificate(bytes(der)) for name, der in
            _sql(pki, "SELECT ca_name, der FROM ca_certificate WHERE generation = 1")}


# --- 1. a database writer swaps CA certificates -------------------------------------------------
def test_a_swapped_device_ca_certificate_is_neither_published_nor_used(
        pki: Pki, tmp_path: Path) -> None:
    stored = _stored(pki)
    attacker_root = ec.generate_private_key(ec.SECP384R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker root")])
    attacker_ca = ec.generate_private_key(ec.SECP256R1())
    der = _attacker_cert(stored[P256].subject, root_name, attacker_ca.public_key(),
                         attacker_root, stored[P256].serial_number)
    _sql(pki, "UPDATE ca_certificate SET der = :der WHERE ca_name = :ca AND generation = 1",
         der=der, ca=P256)
    out = tmp_path / "published"
    with pytest.raises(PkiError, match="CA device-p256 generation 1"):
        steps.export(pki.fleet.engine, out)  # type: ignore[attr-defined]
    assert not list(out.glob("*.pem")) if out.exists() else True
    with pytest.raises(PkiError, match="CA device-p256 generation 1"):
        _issue(pki, ["4D4B530000000101"])


def test_a_planted_root_with_its_own_chain_is_refused(pki: Pki, tmp_path: Path) -> None:
    """The attacker replaces the whole chain: a root of their own (same name and serial) and
    every sub-CA re-signed by it, so that every certificate chains to the stored root."""
    stored = _stored(pki)
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = stored[profiles.ROOT]
    for name, cert in stored.items():
        public = root_key.public_key() if name == profiles.ROOT else \
            ec.generate_private_key(ec.SECP256R1()).public_key()
        der = _attacker_cert(cert.subject, root.subject, public, root_key, cert.serial_number)
        _sql(pki, "UPDATE ca_certificate SET der = :der WHERE ca_name = :ca AND generation = 1",
             der=der, ca=name)
    with pytest.raises(PkiError, match="CA root generation 1.*planted root"):
        steps.export(pki.fleet.engine, tmp_path / "published")  # type: ignore[attr-defined]
    with pytest.raises(PkiError, match="CA root generation 1"):
        steps.issuer(pki.fleet.settings, pki.fleet.engine, P256)  # type: ignore[attr-defined]


# --- 2. a database writer un-revokes a certificate ----------------------------------------------
def test_an_unrevoked_certificate_stays_on_the_crl_and_is_audited(pki: Pki) -> None:
    fleet = pki.fleet
    kept, victim = _issue(pki, ["4D4B530000000111", "4D4B530000000112"])
    steps.revoke(fleet.engine, pki.actor, victim.serial, "key-compromise", utcnow())  # type: ignore[attr-defined]
    _sql(pki, "UPDATE issued_certificate SET revoked_at = NULL, revocation_reason = NULL "
              "WHERE serial = :s", s=str(victim.serial))
    (made,) = steps.issue_crl(fleet.settings, fleet.engine, pki.actor, P256, utcnow())  # type: ignore[attr-defined]
    (der,) = _sql(pki, "SELECT der FROM crl WHERE ca_name = :ca ORDER BY number DESC LIMIT 1",
                  ca=P256)
    crl = x509.load_der_x509_crl(bytes(der[0]))
    assert crl.get_revoked_certificate_by_serial_number(victim.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept.serial) is None
    assert made.revoked == 1 and made.only_in_trail == 1
    (detail,) = _sql(pki, "SELECT detail FROM audit_event WHERE action = 'pki.crl.discrepancy'")
    assert profiles.serial_b64(victim.serial) in detail[0]
    assert steps.check_certificate(fleet.engine, victim.der).state == "revoked"  # type: ignore[attr-defined]


# --- 3. a database writer rolls the CRL number back ---------------------------------------------
def test_deleted_crl_rows_never_let_a_number_be_reused(pki: Pki) -> None:
    fleet = pki.fleet
    numbers = [steps.issue_crl(fleet.settings, fleet.engine, pki.actor, P256, utcnow())[0].number  # type: ignore[attr-defined]
               for _ in range(3)]
    assert numbers == [1, 2, 3]
    _sql(pki, "DELETE FROM crl WHERE ca_name = :ca AND number >= 2", ca=P256)
    (made,) = steps.issue_crl(fleet.settings, fleet.engine, pki.actor, P256, utcnow())  # type: ignore[attr-defined]
    assert made.number == 4
    _sql(pki, "DELETE FROM crl WHERE ca_name = 'root'")
    again = ceremony.ceremony(fleet.settings, fleet.engine, pki.actor)  # type: ignore[attr-defined]
    assert again.crl_number == 2


# --- 4. the PIN holder and the CA keys ----------------------------------------------------------
def _refused(attempt: Any) -> bool:
    try:
        attempt()
    except Exception:  # noqa: BLE001 - any refusal (PKCS#11 error, unsupported) is a refusal
        return True
    return False


def test_the_pin_holder_cannot_take_a_ca_key_nor_find_the_root_key(pki: Pki) -> None:
    ((label,),) = _sql(pki, "SELECT label FROM hsm_key WHERE role = :r",
                       r=profiles.key_role(P256, 1))
    ((root_label, root_id),) = _sql(pki, "SELECT key_label, key_id FROM ca_certificate WHERE "
                                         "ca_name = 'root'")
    with pin_holder_session(pki.fleet.settings, rw=True) as session:  # type: ignore[attr-defined]
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        assert _refused(lambda: key[Attribute.VALUE])
        wrapper = session.generate_key(KeyType.AES, 256, store=False,
                                       template={Attribute.WRAP: True})
        assert _refused(lambda: wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        assert _refused(lambda: key.__setitem__(Attribute.SENSITIVE, False))
        assert _refused(lambda: key.__setitem__(Attribute.EXTRACTABLE, True))
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
        found = [(obj[Attribute.LABEL], bytes(obj[Attribute.ID]).hex())
                 for obj in session.get_objects() if _has_id(obj)]
    assert found and all(lbl != root_label and kid != root_id for lbl, kid in found)
    assert not [lbl for lbl, _ in found if lbl.startswith("meterkeys-ca-root")]


def _has_id(obj: Any) -> bool:
    try:
        obj[Attribute.ID]
        obj[Attribute.LABEL]
    except Exception:  # noqa: BLE001 - objects without an ID or label (session keys)
        return False
    return True


def test_what_the_pin_holder_signs_with_a_ca_key_is_found_out(pki: Pki) -> None:
    """The PIN holder can have the device CA key sign any digest (any HSM signs for whoever
    holds the PIN); the certificate they make that way is not in the inventory: a forgery."""
    (issued,) = _issue(pki, ["4D4B530000000121"])
    ((label,),) = _sql(pki, "SELECT label FROM hsm_key WHERE role = :r",
                       r=profiles.key_role(P256, 1))
    ca = _stored(pki)[P256]
    victim = ec.generate_private_key(ec.SECP256R1()).public_key()
    facts = profiles.IssuerFacts.of(ca, "http://attacker.invalid/crl")
    tbs = signing.certificate_tbs(profiles.device_builder(
        "meterkeys DSO", facts, "4D4B530000000122", profiles.SIGNATURE, victim,
        profiles.new_serial(), utcnow()), "P-256")
    with pin_holder_session(pki.fleet.settings) as session:  # type: ignore[attr-defined]
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        raw = key.sign(signing.digest(tbs, "P-256"), mechanism=Mechanism.ECDSA)
    forged = signing.assemble(tbs, "P-256", raw)
    x509.load_der_x509_certificate(forged).verify_directly_issued_by(ca)  # a valid signature
    engine = pki.fleet.engine  # type: ignore[attr-defined]
    assert steps.check_certificate(engine, forged).state == "forged"
    assert steps.check_certificate(engine, issued.der).state == "issued"
    assert steps.check_certificate(engine, ca.public_bytes(serialization.Encoding.DER)).state \
        == "ca"
    stranger = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    assert steps.check_certificate(engine, _attacker_cert(
        name, name, stranger.public_key(), stranger, 7, ca=False)).state == "unknown"
