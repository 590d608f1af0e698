"""The online PKI's steps: issue and record device certificates, revoke, issue CRLs, export.

These combine the HSM (main token only: the online sub-CAs' keys), the inventory and the audit
trail; the command line and the flows call them and never drive a session themselves.

What the inventory says is checked against the audit trail before it is used or published
(``rules``): a CA certificate must chain to the root its ceremony audited, a revoked CA
generation neither issues nor signs, a revocation the trail records stays on the CRL, and a
CRL number is never issued twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle import policy, principals
from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import AccessDenied, InventoryError, PkiError, RequestError
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.identity import request
from lifecycle.identity.request import SignedRequest
from lifecycle.inventory import certificates, hsm_keys, vendor_cas, vendors
from lifecycle.inventory.certificates import CaCertificate, Crl
from lifecycle.inventory.db import Engine, Session, transaction
from lifecycle.pki import profiles, rules, signing, trust
from lifecycle.pki.issuing import DeviceRequest, Issued, IssueJob, Issuer, curve_of, issue_job

ISSUE_CHUNK = 2000  # certificates per HSM job: one lock hold, one round trip to a worker


def audited(db: Session, actions: Sequence[str]) -> list[rules.Event]:
    """Return the successful PKI events of these actions in the audit trail, oldest first."""
    return [rules.Event(action, at, json.loads(detail))
            for action, at, detail in certificates.trail_events(db, actions)]


def trusted_cas(db: Session) -> dict[tuple[str, int], x509.Certificate]:
    """Return every CA certificate of the inventory, checked against the root and the trail
    (``rules.check_cas``).

    Raises:
        PkiError: a CA certificate that is not the one its ceremony certified.
    """
    records = [rules.CaRecord(r.ca_name, r.generation, bytes(r.der))
               for r in certificates.ca_certificates(db)]
    return rules.check_cas(records, rules.certified(audited(db, (rules.CERTIFY,))))


def _check_usable(db: Session, record: CaCertificate) -> None:
    """Refuse a CA generation that is not the audited one or that a ceremony revoked."""
    trusted_cas(db)
    revoked = rules.revoked_cas(audited(db, (rules.CA_REVOKE,)))
    if record.status == certificates.REVOKED or (record.ca_name, record.generation) in revoked:
        raise PkiError(f"CA {record.ca_name} generation {record.generation}",
                       "is revoked: it neither issues nor signs (renew it at a ceremony)")


def issuer(settings: Settings, engine: Engine, ca_name: str,
           generation: int | None = None) -> Issuer:
    """Return the issuer of an online CA (its newest generation unless one is named).

    Raises:
        PkiError: the CA is the root, unknown, has no certificate yet (run the ceremony), is
            revoked, or its key is not pinned; a CA certificate of the inventory is not the one
            its ceremony certified.
    """
    if profiles.profile(ca_name).name == profiles.ROOT:
        raise PkiError("CA root", "the root is offline: only the ceremony signs with it")
    with transaction(engine) as db:
        record = (certificates.newest_ca(db, ca_name) if generation is None
                  else certificates.ca_generation(db, ca_name, generation))
        if record is None:
            raise PkiError(f"CA {ca_name}", "has no certificate: run meterkeys pki ceremony")
        _check_usable(db, record)
        pinned = hsm_keys.get_pin(db, profiles.key_role(ca_name, record.generation))
    if pinned is None:
        raise PkiError(f"CA {ca_name}", f"key {record.key_label!r} is not pinned")
    return Issuer(ca_name, record.generation, record.curve, record.key_label, record.der,
                  profiles.crl_url(settings.pki_crl_base_url, ca_name, record.generation),
                  settings.dso_name,
                  KeyPin(pinned.role, pinned.label, pinned.key_id, pinned.check_value))


def issue(settings: Settings, engine: Engine, actor: Actor, ca_name: str,
          requests: Sequence[DeviceRequest], now: datetime,
          workers: HsmWorkers | None = None) -> list[Issued]:
    """Issue device certificates with an online CA, record them and audit the batch.

    With ``workers`` the requests go out in chunks of ``ISSUE_CHUNK`` to the HSM workers;
    otherwise they are signed in this process. One audit event per chunk (CA, generation,
    count): per-certificate events would double the trail for every meter.

    Raises:
        PkiError: see ``issuer`` and ``issuing.issue_device_certificates``.
        HsmError: the HSM failed.
    """
    who = issuer(settings, engine, ca_name)
    chunks = [tuple(requests[i:i + ISSUE_CHUNK]) for i in range(0, len(requests), ISSUE_CHUNK)]
    if workers is None:
        results = [issue_job(settings, IssueJob(who, chunk, now)) for chunk in chunks]
    else:
        futures = [workers.submit(issue_job, IssueJob(who, chunk, now)) for chunk in chunks]
        results = [workers.result(future) for future in futures]
    for chunk in results:
        record_issued(engine, actor, who, chunk, now)
    return [cert for chunk in results for cert in chunk]


def record_issued(engine: Engine, actor: Actor, who: Issuer, issued: Sequence[Issued],
                  at: datetime) -> None:
    """Store issued certificates and audit them as one ``pki.certificate.issue`` event."""
    with transaction(engine) as db:
        record_issued_in(db, actor, who, issued, at)


def record_issued_in(db: Session, actor: Actor, who: Issuer, issued: Sequence[Issued],
                     at: datetime) -> None:
    """``record_issued`` inside the caller's transaction (the claim commits certificates with
    the orders that deliver them)."""
    rows = [{"serial": str(c.serial), "ca_name": who.ca_name, "ca_generation": who.generation,
             "subject": c.system_title, "meter_serial": c.meter_serial, "usage": c.usage,
             "not_before": c.not_before, "not_after": c.not_after, "der": c.der,
             "revoked_at": None, "revocation_reason": None} for c in issued]
    certificates.add_issued(db, rows)
    trail.record(db, actor, "pki.certificate.issue", "ok", at=at, detail={
        "ca": who.ca_name, "generation": who.generation, "count": len(rows)})


def revoke(engine: Engine, actor: Actor, serial: int, reason: str, at: datetime) -> str:
    """Revoke an issued certificate (it goes on its CA's next CRL); return its CA's name.

    Raises:
        PkiError: an unknown reason.
        InventoryError: no such certificate, or it is revoked already.
    """
    profiles.reason(reason)
    with transaction(engine) as db:
        record = certificates.revoke(db, str(serial), reason, at)
        trail.record(db, actor, "pki.certificate.revoke", "ok", at=at, detail={
            "ca": record.ca_name, "generation": record.ca_generation,
            "serial": profiles.serial_b64(serial), "reason": reason, "subject": record.subject})
        return record.ca_name


@dataclass(frozen=True)
class IssuedCrl:
    """A CRL issued: whose, its number, its dates and how many certificates it lists."""

    ca_name: str
    generation: int
    number: int
    next_update: datetime
    revoked: int
    only_in_trail: int = 0  # revocations the inventory lost, listed from the trail


def issue_crl(settings: Settings, engine: Engine, actor: Actor, ca_name: str,
              at: datetime) -> list[IssuedCrl]:
    """Issue the next CRL of every unexpired, unrevoked generation of an online CA; store and
    audit each.

    Each generation's key signs the CRL of what it issued (its own CRL URL), so a renewed CA's
    older certificates stay revocable until they expire (a revoked generation's certificates
    are void with it: the root's CRL lists it). The number is one more than the greater of the
    last stored and the last audited for that generation (a concurrent CRL of the same number
    is refused by the inventory's unique constraint). The entries are the inventory's
    revocations and every one the trail records that the inventory lost
    (``rules.crl_entries``); such a discrepancy is audited as ``pki.crl.discrepancy``.

    Raises:
        PkiError: the root (its CRL is the ceremony's), an unknown CA, no certificate yet, or
            a CA certificate that is not the one its ceremony certified.
        KeyPolicyError: a CA key is not the pinned one.
        HsmError: the HSM failed.
    """
    if profiles.profile(ca_name).name == profiles.ROOT:
        raise PkiError("CA root", "the root's CRL is issued by the ceremony (offline key)")
    with transaction(engine) as db:
        revoked = rules.revoked_cas(audited(db, (rules.CA_REVOKE,)))
        live = [r for r in certificates.ca_certificates(db, ca_name) if r.not_after > at
                and r.status != certificates.REVOKED and (r.ca_name, r.generation) not in revoked]
    if not live:
        raise PkiError(f"CA {ca_name}", "has no valid certificate: run meterkeys pki ceremony")
    return [_issue_one_crl(settings, engine, actor, issuer(settings, engine, ca_name,
                                                           record.generation), at)
            for record in live]


def _issue_one_crl(settings: Settings, engine: Engine, actor: Actor, who: Issuer,
                   at: datetime) -> IssuedCrl:
    start = at.replace(microsecond=0)
    next_update = start + policy.CRL_NEXT_UPDATE
    cert = x509.load_der_x509_certificate(who.cert_der)
    with transaction(engine) as db:
        last = certificates.last_crl(db, who.ca_name, who.generation)
        events = audited(db, (rules.REVOKE, rules.CRL_ISSUE))
        stored = [profiles.Revoked(int(r.serial), r.revoked_at, profiles.reason(
            r.revocation_reason or "unspecified")) for r in
            certificates.revoked_by(db, who.ca_name, who.generation, at) if r.revoked_at]
        from_trail = rules.revocations(events, who.ca_name, who.generation)
        expired = {s for s in from_trail if _expired(db, s, at)}
    revoked, lost = rules.crl_entries(stored, from_trail, expired)
    number = rules.next_crl_number(None if last is None else last.number,
                                   rules.last_audited_crl(events, who.ca_name, who.generation))
    facts = profiles.IssuerFacts.of(cert, who.crl_url)
    tbs = signing.crl_tbs(profiles.crl_builder(facts, number, start, next_update, revoked),
                          who.curve)
    with Hsm.open(settings).session() as hs:
        der = signing.sign_crl(hs, who.key_label, who.curve, tbs, cert)
    with transaction(engine) as db:
        certificates.add_crl(db, Crl(ca_name=who.ca_name, generation=who.generation,
                                     number=number, this_update=start, next_update=next_update,
                                     der=der))
        if lost:
            # The inventory says these are not revoked, the trail says they are: the CRL
            # lists them (a revocation is final) and the discrepancy is on the record.
            trail.record(db, actor, "pki.crl.discrepancy", "ok", at=at, detail={
                "ca": who.ca_name, "generation": who.generation, "count": len(lost),
                "only_in_trail": [profiles.serial_b64(s) for s in lost]})
        trail.record(db, actor, rules.CRL_ISSUE, "ok", at=at, detail={
            "ca": who.ca_name, "generation": who.generation, "number": number,
            "revoked_count": len(revoked)})
    return IssuedCrl(who.ca_name, who.generation, number, next_update, len(revoked), len(lost))


def issue_due_crls(settings: Settings, engine: Engine, actor: Actor,
                   at: datetime) -> list[IssuedCrl]:
    """Issue the next CRL of every unexpired, unrevoked online CA generation whose newest CRL
    is missing or past half its validity (``rules.crl_due``); return what was issued.

    Raises:
        PkiError, KeyPolicyError, HsmError: as ``issue_crl``.
    """
    with transaction(engine) as db:
        revoked = rules.revoked_cas(audited(db, (rules.CA_REVOKE,)))
        due = [(r.ca_name, r.generation) for r in certificates.ca_certificates(db)
               if r.ca_name != profiles.ROOT and r.not_after > at
               and r.status != certificates.REVOKED and (r.ca_name, r.generation) not in revoked
               and _due(db, r, at)]
    return [_issue_one_crl(settings, engine, actor, issuer(settings, engine, name, generation),
                           at) for name, generation in due]


def _due(db: Session, record: CaCertificate, at: datetime) -> bool:
    last = _last(db, record)
    if last is None:
        return True
    return rules.crl_due(last.this_update, last.next_update, at)


def publish(settings: Settings, engine: Engine, actor: Actor, at: datetime) -> list[Path]:
    """Export the CA certificates and newest CRLs to ``settings.publish_path`` and audit it
    (``pki.publish``); return the files written.

    Raises:
        InventoryError, PkiError: as ``export``.
    """
    files = export(engine, settings.publish_path)
    with transaction(engine) as db:
        trail.record(db, actor, "pki.publish", "ok", at=at, detail={
            "folder": str(settings.publish_path), "file_count": len(files)})
    return files


def _expired(db: Session, serial: int, at: datetime) -> bool:
    record = certificates.get_issued(db, str(serial))
    return record is not None and record.not_after <= at


def export(engine: Engine, directory: Path) -> list[Path]:
    """Write every CA certificate and each CA generation's newest CRL as PEM; return the files.

    Files: ``<ca>-<generation>.pem`` and ``<ca>-<generation>.crl.pem``. Reads only. Nothing is
    written unless every CA certificate is the one its ceremony certified (``trusted_cas``),
    and each CRL is written only if it verifies under its CA's certificate.

    Raises:
        InventoryError: no CA certificate yet.
        PkiError: a CA certificate or CRL that does not check, naming its CA and generation.
    """
    with transaction(engine) as db:
        cas = certificates.ca_certificates(db)
        crls = [_last(db, r) for r in cas]
        if cas:
            trusted = trusted_cas(db)
    if not cas:
        raise InventoryError("no CA certificate yet: run meterkeys pki ceremony")
    for record, crl in zip(cas, crls, strict=True):
        if crl is not None:
            _check_crl(trusted[(record.ca_name, record.generation)], crl)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for record, crl in zip(cas, crls, strict=True):
        stem = f"{record.ca_name}-{record.generation}"
        pem = x509.load_der_x509_certificate(record.der).public_bytes(
            serialization.Encoding.PEM)
        out.append(_write(directory / f"{stem}.pem", pem))
        if crl is not None:
            out.append(_write(directory / f"{stem}.crl.pem", x509.load_der_x509_crl(
                crl.der).public_bytes(serialization.Encoding.PEM)))
    return out


def _check_crl(ca: x509.Certificate, crl: Crl) -> None:
    public = ca.public_key()
    parsed = x509.load_der_x509_crl(crl.der)
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            not parsed.is_signature_valid(public) or parsed.issuer != ca.subject:
        raise PkiError(f"CRL {crl.number} of CA {crl.ca_name} generation {crl.generation}",
                       "is not signed by its CA: refusing to publish it")


def _last(db: Session, record: CaCertificate) -> Crl | None:
    return certificates.last_crl(db, record.ca_name, record.generation)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@dataclass(frozen=True)
class Verdict:
    """What the inventory knows of a certificate: ``issued`` (here, in force), ``revoked``,
    ``ca`` (one of this PKI's CA certificates), ``forged`` (signed by one of this PKI's CA keys
    but never issued or recorded here) or ``unknown`` (not of this PKI); and why."""

    state: str
    why: str


def check_certificate(engine: Engine, der: bytes) -> Verdict:
    """Tell whether a certificate found in the field is one this PKI issued.

    The PIN holder of a host can have a CA key sign any digest (every HSM signs for whoever
    holds the PIN); what they cannot do is record it here, audited: a certificate under one of
    this PKI's CA keys that the inventory does not hold is a forgery.

    Raises:
        PkiError: a CA certificate of the inventory does not check (``trusted_cas``).
    """
    cert = x509.load_der_x509_certificate(der)
    with transaction(engine) as db:
        cas = trusted_cas(db)
        record = certificates.get_issued(db, str(cert.serial_number))
        events = audited(db, (rules.REVOKE,)) if record is not None else []
    for (name, generation), ca in cas.items():
        if ca.public_bytes(serialization.Encoding.DER) == der:
            return Verdict("ca", f"CA certificate of {name} generation {generation}")
    if record is not None and bytes(record.der) == der:
        where = f"issued by {record.ca_name} generation {record.ca_generation}"
        in_trail = cert.serial_number in rules.revocations(events, record.ca_name,
                                                           record.ca_generation)
        if record.revoked_at is not None or in_trail:
            why = record.revocation_reason or "in the audit trail"
            return Verdict("revoked", f"{where}, revoked ({why})")
        return Verdict("issued", f"{where} to {record.subject}, valid until "
                                 f"{record.not_after:%Y-%m-%d}")
    for (name, generation), ca in cas.items():
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return Verdict("forged", f"signed by CA {name} generation {generation} but never "
                                 "issued here: its key signed outside meterkeys")
    return Verdict("unknown", "not signed by any CA of this PKI")


def ca_list(engine: Engine) -> list[CaCertificate]:
    """Return every CA certificate, by CA and generation."""
    with transaction(engine) as db:
        return certificates.ca_certificates(db)


# --- manufacturers' factory CAs -----------------------------------------------------------------
def add_vendor_ca(engine: Engine, actor: Actor, vendor: str, pem: str, at: datetime, *,
                  requests: Sequence[SignedRequest]) -> str:
    """Register a vendor's factory CA certificate (checked: ``trust.check_factory_ca``) and audit
    it; return its subject.

    ``requests`` are the two security officers' signed requests for ``vendor.add-ca`` on
    ``{"name": vendor, "certificate_pem": pem}`` that were accepted for ``actor``; the row keeps
    them with the PEM, so that it proves its own registration (``factory_anchors``).

    Raises:
        PkiError: not a PEM certificate, or not fit (not a CA, wrong key, not valid now).
        InventoryError: unknown vendor, or the certificate is registered already.
    """
    try:
        der = x509.load_pem_x509_certificate(pem.encode("ascii")).public_bytes(
            serialization.Encoding.DER)
    except ValueError:
        raise PkiError(f"factory CA of {vendor}", "not a PEM X.509 certificate") from None
    cert = trust.check_factory_ca(der, at)
    fingerprint = hashlib.sha256(der).hexdigest()
    subject = cert.subject.rfc4514_string()
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    with transaction(engine) as db:
        record = vendors.get_vendor(db, vendor)
        assert record.id is not None
        vendor_cas.add_vendor_ca(db, vendor_cas.VendorCa(
            vendor_id=record.id, fingerprint=fingerprint, subject=subject,
            curve=curve_of(public), not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc, der=der,
            registration=request.canonical({"certificate_pem": pem,
                                            "requests": request.encode(requests)})))
        trail.record(db, actor, trust.REGISTRATION, "ok", at=at, detail={
            "vendor": vendor, "subject": subject, "curve": curve_of(public),
            "sha256_prefix": fingerprint[:trust.PREFIX],
            "not_after": cert.not_valid_after_utc.isoformat()})
    return subject


def factory_cas(engine: Engine, settings: Settings, vendor: str) -> list[bytes]:
    """Return the DER of a vendor's registered factory CA certificates that their registration
    and the audit trail attest (``factory_anchors``; for ``trust``).

    Raises:
        InventoryError: unknown vendor.
    """
    with transaction(engine) as db:
        record = vendors.get_vendor(db, vendor)
        assert record.id is not None
    return list(factory_anchors(engine, settings, [record.id])[record.id].trusted)


def factory_anchors(engine: Engine, settings: Settings,
                    vendor_ids: Sequence[int]) -> dict[int, trust.Anchors]:
    """Return, by vendor id, the vendors' factory CA certificates that are attested, and the
    rows that are not with why: a row counts only when the two security officers' signed
    requests it keeps verify (``principals.verify_stored``: back to the anchor, for this
    vendor and exactly this certificate) and the audit trail registered it
    (``trust.check_registered``). A row planted, moved to another vendor or altered by SQL is
    never an anchor."""
    with transaction(engine) as db:
        rows = vendor_cas.named_vendor_cas(db, vendor_ids)
        registered = vendor_cas.registrations(db, trust.REGISTRATION)
        checked = [_registered(db, settings, name, row) for name, row in rows]
    return {v: trust.anchors([c for (_, row), c in zip(rows, checked, strict=True)
                              if row.vendor_id == v], registered) for v in vendor_ids}


def verify_vendor_cas(engine: Engine, settings: Settings) -> list[str]:
    """Check every factory CA row against its signed registration and the audit trail; return
    one problem line per row not attested and per registration whose row is gone (none: all
    agree). For ``audit verify``."""
    with transaction(engine) as db:
        rows = vendor_cas.named_vendor_cas(db)
        registered = vendor_cas.registrations(db, trust.REGISTRATION)
        checked = [_registered(db, settings, name, row) for name, row in rows]
    return trust.unregistered(checked, registered)


def _registered(db: Session, settings: Settings, vendor: str,
                row: vendor_cas.VendorCa) -> trust.RegisteredCa:
    return trust.RegisteredCa(vendor, row.fingerprint, row.subject, bytes(row.der),
                              _unsigned(db, settings, vendor, row))


def _unsigned(db: Session, settings: Settings, vendor: str,
              row: vendor_cas.VendorCa) -> str | None:
    """Why a row's registration does not prove it (None: the officers' requests verify)."""
    if row.registration is None:
        return "it keeps no signed registration (register it again with vendor add-ca)"
    try:
        kept = json.loads(row.registration)
        pem, requests = str(kept["certificate_pem"]), request.decode(str(kept["requests"]))
        der = x509.load_pem_x509_certificate(pem.encode("ascii")).public_bytes(
            serialization.Encoding.DER)
    except (ValueError, KeyError, TypeError, RequestError):
        return "its signed registration is malformed"
    if der != bytes(row.der):
        return "its certificate is not the one the officers signed"
    try:
        principals.verify_stored(db, settings, requests, trust.REGISTRATION,
                                 {"name": vendor, "certificate_pem": pem})
    except (RequestError, AccessDenied) as exc:
        return f"its signed registration does not verify: {exc}"
    return None


__all__ = ["ISSUE_CHUNK", "IssuedCrl", "Verdict", "audited", "ca_list", "check_certificate",
           "export", "issue", "issue_crl", "issue_due_crls", "issuer", "publish",
           "record_issued", "record_issued_in", "revoke", "trusted_cas", "add_vendor_ca",
           "factory_anchors", "factory_cas", "verify_vendor_cas"]
