"""The key ceremony: the offline root, the online sub-CAs' keys and certificates, the root's CRL.

Performed only on two security officers' signatures over ``pki.ceremony`` and its parameters
(``lifecycle.principals.DUAL_CONTROL``; ``meterkeys pki ceremony`` then ``meterkeys approve``).
In order:

1. The root token (``root_token_label``) is created on first use, with PINs of its own
   (``root_pin_file``, ``root_so_pin_file``: on the embedded default ``<home>/secrets/
   root-user.pin`` and ``root-so.pin``, random, 0600; the SO PIN is removed after use unless
   ``keep_so_pin``). This module is the only one that names those settings: the online
   processes open the main token only and never read the root PIN.
2. One spawned child logs in to the root token (``lifecycle.pki.root``) and, if absent, makes
   the root key (P-384, CA key profile) and signs the self-signed root certificate.
3. Every sub-CA due (``rules.ceremony_plan``: absent, renewed, or its newest generation
   revoked) gets a new key in the main token, pinned in ``hsm_key`` at once (role
   ``ca:<name>:<generation>``), and a certificate signed by the root in the child; then the
   root signs its next CRL, which lists every sub-CA generation a ceremony revoked (``revoke``:
   ``<ca>:<generation>`` pairs, part of the parameters the officers signed) until it expires.
4. Certificates and the CRL are verified under the root's key, stored, and audited (each
   certificate by CA, generation, serial and the SHA-256 of its SubjectPublicKeyInfo, both in
   base64: the trail refuses 32+ hex digits), and the trail's head is signed and witnessed at
   once, so what the online processes check the inventory's CA certificates against
   (``rules.check_cas``) is anchored.

A ceremony that fails midway is run again: keys already made and pinned are reused (the root
key under its fixed label, ``profiles.root_key_label``), nothing is stored twice. Renewing a
sub-CA never revokes its older generation: the certificates it issued stay valid until they
expire, unless a ceremony revokes it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle import policy
from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings, ensure_private_dir
from lifecycle.errors import ConfigError, MeterkeysError, PkiError
from lifecycle.hsm import keyring, provision
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.hsm.templates import CA_KEY
from lifecycle.installation.steps import record_failure
from lifecycle.inventory import certificates, hsm_keys
from lifecycle.inventory.certificates import REVOKED, CaCertificate, Crl
from lifecycle.inventory.db import Engine, Session, transaction
from lifecycle.pki import profiles, rules, signing
from lifecycle.pki.profiles import ROOT, CaProfile, IssuerFacts, Revoked
from lifecycle.pki.root import RootKeyJob, RootSignJob, ensure_root_key, sign_with_root
from lifecycle.pki.steps import audited

ROOT_GENERATION = 1
ACTION = "pki.ceremony"


def root_token_settings(settings: Settings) -> Settings:
    """Return the settings of the root token: its label and its own PIN files, no PIN value.

    Only the ceremony calls this: no other process ever holds these settings.
    """
    secrets_dir = settings.secrets_dir
    return settings.model_copy(update={
        "token_label": settings.root_token_label, "pin": None, "so_pin": None,
        "pin_file": settings.root_pin_file or secrets_dir / "root-user.pin",
        "so_pin_file": settings.root_so_pin_file or secrets_dir / "root-so.pin"})


@dataclass(frozen=True)
class CeremonyReport:
    """What a ceremony did: CA -> generation certified, the root CRL's number, the token."""

    made: dict[str, int]
    crl_number: int
    root_token_created: bool
    revoked: tuple[str, ...] = ()  # "<ca>:<generation>" revoked by this ceremony


def ceremony(settings: Settings, engine: Engine, actor: Actor, *,
             renew: Collection[str] = (), revoke: Collection[str] = (),
             reason: str = "key-compromise", now: datetime | None = None) -> CeremonyReport:
    """Create the root when absent, revoke sub-CA generations, make or renew the due sub-CAs,
    issue the root's CRL.

    ``actor`` is the principal the two officers' signatures were accepted for (over ``renew``,
    ``revoke`` and ``reason``); a failure is audited as failed and raised.

    Raises:
        ConfigError: ``METERKEYS_PIN`` is set (the root child would take it for the root PIN).
        PkiError: a renewal of the root or of an unknown CA; a revocation of the root, of an
            unknown or already revoked generation, or for a reason not for a CA; a signature
            that does not verify.
        KeyPolicyError: a CA key is not the pinned one or is weaker than policy.
        HsmError: a token refused an operation.
    """
    at = now or utcnow()
    try:
        return _ceremony(settings, engine, actor, sorted(renew),
                         rules.parse_ca_revocations(revoke, reason), reason, at)
    except MeterkeysError as exc:
        record_failure(engine, actor, ACTION, exc,
                       {"renew": sorted(renew), "revoke": sorted(revoke)}, at)
        raise


@dataclass(frozen=True)
class _Revocation:
    """A sub-CA generation this ceremony revokes, with its root CRL entry."""

    record: CaCertificate
    entry: Revoked


def _ceremony(settings: Settings, engine: Engine, actor: Actor, renew: list[str],
              revoke: list[tuple[str, int]], reason: str, at: datetime) -> CeremonyReport:
    if os.environ.get("METERKEYS_PIN"):
        raise ConfigError("METERKEYS_PIN is set: unset it for the ceremony (the root token has "
                          "a PIN of its own, and the main token's PIN is read from its file)")
    start = at.replace(microsecond=0)
    with transaction(engine) as db:
        events = audited(db, (rules.CA_REVOKE, rules.CRL_ISSUE))
        was_revoked = rules.revoked_cas(events)
        revoking = _revocations(db, revoke, was_revoked, profiles.reason(reason), start)
        gone = was_revoked.keys() | {(r.record.ca_name, r.record.generation) for r in revoking}
        current = {name: _state(certificates.newest_ca(db, name), gone) for name in profiles.CAS}
        stored_root = certificates.current_ca(db, ROOT)
        last = certificates.last_crl(db, ROOT, ROOT_GENERATION)
        listed, lost = _root_crl_entries(db, was_revoked, revoking, start)
    number = rules.next_crl_number(None if last is None else last.number,
                                   rules.last_audited_crl(events, ROOT, ROOT_GENERATION))
    plan = rules.ceremony_plan(current, renew, at)
    root_settings = root_token_settings(settings)
    created = _ensure_root_token(root_settings)
    with HsmWorkers(root_settings, 1) as child:
        root_cert, root_pin, root_record = _root(settings, child, stored_root, start)
        signer = _RootSigner(child, root_pin)
        facts = IssuerFacts.of(root_cert, _root_crl_url(settings))
        subs = _certify_subs(settings, engine, actor, signer, root_cert, facts,
                             {n: g for n, g in plan.items() if n != ROOT}, start, at)
        crl = _root_crl(signer, root_cert, facts, number, start, listed)
    _record(engine, actor, _Made(root_record, subs, crl, len(listed), created), revoking, lost,
            at)
    _checkpoint(settings, engine, at)
    keyring.trust(KeyPin(profiles.key_role(r.ca_name, r.generation), r.key_label, r.key_id,
                         _spki_sha256(x509.load_der_x509_certificate(r.der)))
                  for r in subs)
    made = {r.ca_name: r.generation for r in ([root_record] if root_record else []) + subs}
    return CeremonyReport(made, number, created, tuple(
        f"{r.record.ca_name}:{r.record.generation}" for r in revoking))


def _state(record: CaCertificate | None,
           revoked: Collection[tuple[str, int]]) -> rules.CaState | None:
    if record is None:
        return None
    return rules.CaState(record.ca_name, record.generation, record.not_before,
                         record.status == REVOKED
                         or (record.ca_name, record.generation) in revoked)


def _revocations(db: Session, revoke: list[tuple[str, int]],
                 was_revoked: Mapping[tuple[str, int], Revoked], reason: x509.ReasonFlags,
                 start: datetime) -> list[_Revocation]:
    """Return the revocations asked for, each of a stored generation not revoked yet.

    Raises:
        PkiError: a generation not stored, or revoked already (by the inventory or the trail).
    """
    out = []
    for name, generation in revoke:
        record = certificates.ca_generation(db, name, generation)
        what = f"CA {name} generation {generation}"
        if record is None:
            raise PkiError(what, "is not in the inventory: nothing to revoke")
        if record.status == REVOKED or (name, generation) in was_revoked:
            raise PkiError(what, "is revoked already")
        out.append(_Revocation(record, Revoked(int(record.serial), start, reason)))
    return out


def _root_crl_entries(db: Session, was_revoked: Mapping[tuple[str, int], Revoked],
                      revoking: Sequence[_Revocation],
                      start: datetime) -> tuple[list[Revoked], list[int]]:
    """Return the root CRL's entries (every unexpired revoked sub-CA generation, from the
    inventory and the trail) and the serials only the trail still revokes."""
    records = certificates.ca_certificates(db)
    audited_by_serial = {e.serial: e for e in was_revoked.values()}
    stored = [audited_by_serial.get(int(r.serial), Revoked(int(r.serial), start,
                                                           x509.ReasonFlags.unspecified))
              for r in records if r.status == REVOKED and r.not_after > start]
    stored += [r.entry for r in revoking]
    expired = {int(r.serial) for r in records if r.not_after <= start}
    return rules.crl_entries(stored, audited_by_serial, expired)


def _root_crl_url(settings: Settings) -> str:
    return profiles.crl_url(settings.pki_crl_base_url, ROOT, ROOT_GENERATION)


# --- the root token -----------------------------------------------------------------------------
def _ensure_root_token(root: Settings) -> bool:
    """Create the root token with fresh random PINs unless it exists; return if created."""
    if provision.token_exists(root):
        return False
    assert root.pin_file is not None and root.so_pin_file is not None
    for path in (root.so_pin_file, root.pin_file):
        ensure_private_dir(path.parent, "root PIN folder")
        if not path.exists():
            provision.write_private(path, secrets.token_urlsafe(24).encode("ascii"))
    provision.init_token(root)
    if not root.keep_so_pin and root.so_pin_file == root.secrets_dir / "root-so.pin":
        # As for the main token: the SO PIN only initialises the token (provision.discard_so_pin).
        root.so_pin_file.unlink()
    return True


class _RootSigner:
    """A ``DigestSigner`` that has the ceremony's child sign with the root key."""

    def __init__(self, child: HsmWorkers, pin: KeyPin) -> None:
        self._child = child
        self._pin = pin
        self.label = pin.label

    def sign_digests(self, label: str, digests: Sequence[bytes]) -> list[bytes]:
        if label != self._pin.label:
            raise PkiError(f"CA key {label!r}", "the root's child signs with the root key only")
        return self._child.result(self._child.submit(sign_with_root,
                                                     RootSignJob(self._pin, tuple(digests))))


def _root(settings: Settings, child: HsmWorkers, stored: CaCertificate | None,
          start: datetime) -> tuple[x509.Certificate, KeyPin, CaCertificate | None]:
    """Return the root certificate, its key's pin, and the record to store if it is new."""
    ca = profiles.CAS[ROOT]
    role = profiles.key_role(ROOT, ROOT_GENERATION)
    if stored is not None:
        cert = x509.load_der_x509_certificate(stored.der)
        return cert, KeyPin(role, stored.key_label, stored.key_id, _spki_sha256(cert)), None
    label = profiles.root_key_label()
    key = child.result(child.submit(ensure_root_key, RootKeyJob(label, ca.curve, role)))
    public = _ec_public(key.public_pem, label)
    builder = profiles.ca_builder(settings.dso_name, ca, ROOT_GENERATION, public, None,
                                  profiles.new_serial(), start)
    (der,) = signing.sign_certificates(_RootSigner(child, key.pin), label, ca.curve,
                                       [signing.certificate_tbs(builder, ca.curve)], None)
    cert = x509.load_der_x509_certificate(der)
    if _spki_sha256(cert) != key.pin.check_value:
        raise PkiError("root certificate", "does not certify the root token's key")
    return cert, key.pin, _record_of(ca, ROOT_GENERATION, cert, der, key.pin)


# --- the online sub-CAs -------------------------------------------------------------------------
def _certify_subs(settings: Settings, engine: Engine, actor: Actor, signer: _RootSigner,
                  root_cert: x509.Certificate, facts: IssuerFacts, due: dict[str, int],
                  start: datetime, at: datetime) -> list[CaCertificate]:
    root = profiles.CAS[ROOT]
    pins, tbs = [], []
    for name, generation in due.items():
        ca = profiles.CAS[name]
        pin, public_pem = _online_key(settings, engine, actor, ca, generation, at)
        builder = profiles.ca_builder(settings.dso_name, ca, generation,
                                      _ec_public(public_pem, pin.label), facts,
                                      profiles.new_serial(), start)
        pins.append(pin)
        tbs.append(signing.certificate_tbs(builder, root.curve))
    ders = signing.sign_certificates(signer, signer.label, root.curve, tbs, root_cert)
    out = []
    for (name, generation), pin, der in zip(due.items(), pins, ders, strict=True):
        cert = x509.load_der_x509_certificate(der)
        out.append(_record_of(profiles.CAS[name], generation, cert, der, pin))
    return out


def _online_key(settings: Settings, engine: Engine, actor: Actor, ca: CaProfile,
                generation: int, at: datetime) -> tuple[KeyPin, bytes]:
    """Return the pin and public PEM of a sub-CA key in the main token, made and pinned if new.

    A key pinned by an earlier ceremony that failed before its certificate was stored is
    checked against its pin and reused.
    """
    role, label = profiles.key_role(ca.name, generation), profiles.new_key_label(ca.name,
                                                                                 generation)
    with transaction(engine) as db:
        pinned = hsm_keys.get_pin(db, role)
    with Hsm.open(settings).session() as hs:
        if pinned is not None:
            pin = KeyPin(role, pinned.label, pinned.key_id, pinned.check_value)
            hs.check_key(pin.label, CA_KEY, pin)
            return pin, hs.public_key_pem(pin.label)
        pin = hs.generate_ca_key(label, ca.curve, role)
        public_pem = hs.public_key_pem(label)
    with transaction(engine) as db:
        hsm_keys.put_pin(db, role, label, pin.key_id, pin.check_value)
        trail.record(db, actor, "hsm.key.create", "ok", at=at,
                     detail={"role": role, "label": label})
    return pin, public_pem


def _root_crl(signer: _RootSigner, root_cert: x509.Certificate, facts: IssuerFacts,
              number: int, start: datetime, listed: list[Revoked]) -> Crl:
    curve = profiles.CAS[ROOT].curve
    builder = profiles.crl_builder(facts, number, start, start + policy.ROOT_CRL_NEXT_UPDATE,
                                   listed)
    der = signing.sign_crl(signer, signer.label, curve, signing.crl_tbs(builder, curve),
                           root_cert)
    return Crl(ca_name=ROOT, generation=ROOT_GENERATION, number=number, this_update=start,
               next_update=start + policy.ROOT_CRL_NEXT_UPDATE, der=der)


# --- records ------------------------------------------------------------------------------------
def _record_of(ca: CaProfile, generation: int, cert: x509.Certificate, der: bytes,
               pin: KeyPin) -> CaCertificate:
    return CaCertificate(ca_name=ca.name, generation=generation, kind=ca.kind, curve=ca.curve,
                         serial=str(cert.serial_number), subject=cert.subject.rfc4514_string(),
                         not_before=cert.not_valid_before_utc,
                         not_after=cert.not_valid_after_utc, der=der, key_label=pin.label,
                         key_id=pin.key_id)


@dataclass(frozen=True)
class _Made:
    """What the ceremony made, to store: certificates, the root's CRL and what it lists."""

    root: CaCertificate | None
    subs: list[CaCertificate]
    crl: Crl
    listed: int
    token_created: bool


def _record(engine: Engine, actor: Actor, made: _Made, revoking: Sequence[_Revocation],
            lost: Sequence[int], at: datetime) -> None:
    certified = ([made.root] if made.root else []) + made.subs
    with transaction(engine) as db:
        for revocation in revoking:
            record = revocation.record
            certificates.mark_ca_revoked(db, record.ca_name, record.generation)
            trail.record(db, actor, rules.CA_REVOKE, "ok", at=at, detail={
                "ca": record.ca_name, "generation": record.generation,
                "serial": profiles.serial_b64(int(record.serial)),
                "reason": _reason_name(revocation.entry.reason)})
        for record in certified:
            certificates.add_ca_certificate(db, record)
            trail.record(db, actor, rules.CERTIFY, "ok", at=at, detail={
                "ca": record.ca_name, "generation": record.generation,
                "serial": profiles.serial_b64(int(record.serial)), "subject": record.subject,
                "spki_sha256": rules.spki_digest(x509.load_der_x509_certificate(record.der)),
                "not_after": record.not_after.isoformat()})
        certificates.add_crl(db, made.crl)
        if lost:
            trail.record(db, actor, "pki.crl.discrepancy", "ok", at=at, detail={
                "ca": ROOT, "generation": ROOT_GENERATION, "count": len(lost),
                "only_in_trail": [profiles.serial_b64(s) for s in lost]})
        trail.record(db, actor, rules.CRL_ISSUE, "ok", at=at, detail={
            "ca": made.crl.ca_name, "generation": made.crl.generation,
            "number": made.crl.number, "revoked_count": made.listed})
        trail.record(db, actor, ACTION, "ok", at=at, detail={
            "certified": {r.ca_name: r.generation for r in certified},
            "revoked": [f"{r.record.ca_name}:{r.record.generation}" for r in revoking],
            "root_crl_number": made.crl.number,
            "root_token": "created" if made.token_created else "present"})


def _reason_name(flag: x509.ReasonFlags) -> str:
    return next(name for name, value in profiles.REASONS.items() if value is flag)


def _checkpoint(settings: Settings, engine: Engine, at: datetime) -> None:
    """Sign the trail's head and witness it, so the ceremony's events are anchored at once."""
    with Hsm.open(settings).session() as hs, transaction(engine) as db:
        trail.checkpoint(db, hs, settings, at)


def _spki_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _ec_public(pem: bytes, label: str) -> ec.EllipticCurvePublicKey:
    public = serialization.load_pem_public_key(pem)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PkiError(f"CA key {label!r}", "is not an EC key")
    return public


__all__ = ["ACTION", "CeremonyReport", "ceremony", "root_token_settings"]
