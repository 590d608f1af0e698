"""The online PKI's steps: issue and record device certificates, revoke, issue CRLs, export.

These combine the HSM (main token only: the online sub-CAs' keys), the inventory and the audit
trail; the command line and the flows call them and never drive a session themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle import policy
from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import InventoryError, PkiError
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.inventory import certificates, hsm_keys, vendor_cas, vendors
from lifecycle.inventory.certificates import CaCertificate, Crl
from lifecycle.inventory.db import Engine, Session, transaction
from lifecycle.pki import profiles, rules, signing, trust
from lifecycle.pki.issuing import DeviceRequest, Issued, IssueJob, Issuer, curve_of, issue_job

ISSUE_CHUNK = 2000  # certificates per HSM job: one lock hold, one round trip to a worker


def issuer(settings: Settings, engine: Engine, ca_name: str,
           generation: int | None = None) -> Issuer:
    """Return the issuer of an online CA (its newest active generation unless one is named).

    Raises:
        PkiError: the CA is the root, unknown, or has no certificate yet (run the ceremony), or
            its key is not pinned.
    """
    if profiles.profile(ca_name).name == profiles.ROOT:
        raise PkiError("CA root", "the root is offline: only the ceremony signs with it")
    with transaction(engine) as db:
        record = (certificates.current_ca(db, ca_name) if generation is None
                  else certificates.ca_generation(db, ca_name, generation))
        if record is None:
            raise PkiError(f"CA {ca_name}", "has no certificate: run meterkeys pki ceremony")
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


def issue_crl(settings: Settings, engine: Engine, actor: Actor, ca_name: str,
              at: datetime) -> list[IssuedCrl]:
    """Issue the next CRL of every unexpired generation of an online CA; store and audit each.

    Each generation's key signs the CRL of what it issued (its own CRL URL), so a renewed CA's
    older certificates stay revocable until they expire. The number is one more than the last
    stored for that generation (a concurrent CRL of the same number is refused by the
    inventory's unique constraint).

    Raises:
        PkiError: the root (its CRL is the ceremony's), an unknown CA, or no certificate yet.
        KeyPolicyError: a CA key is not the pinned one.
        HsmError: the HSM failed.
    """
    if profiles.profile(ca_name).name == profiles.ROOT:
        raise PkiError("CA root", "the root's CRL is issued by the ceremony (offline key)")
    with transaction(engine) as db:
        live = [r for r in certificates.ca_certificates(db, ca_name) if r.not_after > at]
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
        revoked = [profiles.Revoked(int(r.serial), r.revoked_at, profiles.reason(
            r.revocation_reason or "unspecified")) for r in
            certificates.revoked_by(db, who.ca_name, who.generation, at) if r.revoked_at]
    number = rules.next_crl_number(None if last is None else last.number)
    facts = profiles.IssuerFacts.of(cert, who.crl_url)
    tbs = signing.crl_tbs(profiles.crl_builder(facts, number, start, next_update, revoked),
                          who.curve)
    with Hsm.open(settings).session() as hs:
        der = signing.sign_crl(hs, who.key_label, who.curve, tbs, cert)
    with transaction(engine) as db:
        certificates.add_crl(db, Crl(ca_name=who.ca_name, generation=who.generation,
                                     number=number, this_update=start, next_update=next_update,
                                     der=der))
        trail.record(db, actor, "pki.crl.issue", "ok", at=at, detail={
            "ca": who.ca_name, "generation": who.generation, "number": number,
            "revoked_count": len(revoked)})
    return IssuedCrl(who.ca_name, who.generation, number, next_update, len(revoked))


def export(engine: Engine, directory: Path) -> list[Path]:
    """Write every CA certificate and each CA generation's newest CRL as PEM; return the files.

    Files: ``<ca>-<generation>.pem`` and ``<ca>-<generation>.crl.pem``. Reads only.

    Raises:
        InventoryError: no CA certificate yet.
    """
    with transaction(engine) as db:
        cas = certificates.ca_certificates(db)
        crls = [_last(db, r) for r in cas]
    if not cas:
        raise InventoryError("no CA certificate yet: run meterkeys pki ceremony")
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


def _last(db: Session, record: CaCertificate) -> Crl | None:
    return certificates.last_crl(db, record.ca_name, record.generation)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def ca_list(engine: Engine) -> list[CaCertificate]:
    """Return every CA certificate, by CA and generation."""
    with transaction(engine) as db:
        return certificates.ca_certificates(db)


# --- manufacturers' factory CAs -----------------------------------------------------------------
def add_vendor_ca(engine: Engine, actor: Actor, vendor: str, pem: str, at: datetime) -> str:
    """Register a vendor's factory CA certificate (checked: ``trust.check_factory_ca``) and audit
    it; return its subject.

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
            not_after=cert.not_valid_after_utc, der=der))
        trail.record(db, actor, "vendor.add-ca", "ok", at=at, detail={
            "vendor": vendor, "subject": subject, "curve": curve_of(public),
            "sha256_prefix": fingerprint[:16], "not_after": cert.not_valid_after_utc.isoformat()})
    return subject


def factory_cas(engine: Engine, vendor: str) -> list[bytes]:
    """Return the DER of a vendor's registered factory CA certificates (for ``trust``).

    Raises:
        InventoryError: unknown vendor.
    """
    with transaction(engine) as db:
        record = vendors.get_vendor(db, vendor)
        assert record.id is not None
        return [bytes(r.der) for r in vendor_cas.vendor_cas(db, record.id)]


__all__ = ["ISSUE_CHUNK", "IssuedCrl", "ca_list", "export", "issue", "issue_crl", "issuer",
           "record_issued", "record_issued_in", "revoke", "add_vendor_ca", "factory_cas"]
