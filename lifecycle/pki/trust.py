"""Manufacturer trust, pure: a meter's factory certificate against its vendor's factory CAs.

A suite 1 or 2 meter arrives with a factory certificate made by its manufacturer's factory CA.
Before the DSO takes the meter over (the claim), the certificate must show, at ``now``:

1. chain: issued and signed by one of the vendor's registered factory CA certificates, itself a
   CA (basicConstraints cA, keyUsage keyCertSign) valid at ``now`` (RFC 5280 §6.1.3);
2. validity: ``now`` within notBefore..notAfter (RFC 5280 §4.1.2.5);
3. key usage: an end entity (no cA) whose keyUsage allows digitalSignature or keyAgreement, the
   DLMS uses of a server key (DLMS Green Book §9.2.6);
4. subject: it names the meter's system title, in the CN as the Green Book profile puts it, or
   in the serialNumber attribute as some manufacturers (and the simulator) do;
5. key: an EC key on the suite's curve (P-256 for suite 1, P-384 for suite 2).

Each failure raises ``FactoryTrustError`` naming the meter and the rule, never a bool.
``check_factory_job`` verifies a batch of meters and returns each one's refusal, as an
``HsmWorkers`` job: it needs no HSM, but a chunk's thousands of signature checks then run in
the worker processes, in parallel, instead of in the flow's.

Which factory CAs count as registered is itself checked (``check_registered``): a ``vendor_ca``
row is trusted only if the audit trail holds the ``vendor.add-ca`` event that registered that
certificate (its SHA-256 prefix, subject and notAfter) for that vendor. Anyone who can write the
inventory can insert a row; only two security officers' signed request appends the event, and
the trail is checked against its signed checkpoints and the witness by ``audit verify``, so a
planted CA (and every meter certificate it signs) is refused, and a row moved to another vendor
too.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lifecycle.config import Settings
from lifecycle.errors import FactoryTrustError, PkiError
from lifecycle.pki.issuing import curve_of
from lifecycle.policy import SUITES

FACTORY_CA_CURVES = ("P-256", "P-384")
REGISTRATION = "vendor.add-ca"  # the audit action that registers a factory CA (dual control)
PREFIX = 16  # hex digits of the SHA-256 fingerprint the registration event carries


def _load(der: bytes, meter: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise FactoryTrustError(meter, "not a DER X.509 certificate") from None


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    constraints = _extension(cert, x509.BasicConstraints)
    usage = _extension(cert, x509.KeyUsage)
    return (isinstance(constraints, x509.BasicConstraints) and constraints.ca
            and isinstance(usage, x509.KeyUsage) and usage.key_cert_sign)


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def check_factory_ca(der: bytes, now: datetime) -> x509.Certificate:
    """Return a factory CA certificate fit to register: a CA, EC P-256/P-384, valid at ``now``.

    Raises:
        PkiError: naming what is wrong with it.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise PkiError("factory CA certificate", "not a DER X.509 certificate") from None
    what = f"factory CA {cert.subject.rfc4514_string()}"
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            curve_of(public) not in FACTORY_CA_CURVES:
        raise PkiError(what, "its key is not an EC key on P-256 or P-384")
    if not _is_ca(cert):
        raise PkiError(what, "not a CA certificate (basicConstraints cA and keyCertSign)")
    if not _valid_at(cert, now):
        raise PkiError(what, f"not valid at {now.isoformat()} (valid "
                             f"{cert.not_valid_before_utc:%Y-%m-%d} to "
                             f"{cert.not_valid_after_utc:%Y-%m-%d})")
    return cert


def _issuer(cert: x509.Certificate, cas: Sequence[x509.Certificate], meter: str,
            now: datetime) -> x509.Certificate:
    named = [ca for ca in cas if ca.subject == cert.issuer]
    for ca in named:
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            continue
        if not _is_ca(ca):
            raise FactoryTrustError(meter, f"issuer {ca.subject.rfc4514_string()} is not a CA")
        if not _valid_at(ca, now):
            raise FactoryTrustError(meter, f"factory CA {ca.subject.rfc4514_string()} is not "
                                           f"valid at {now.isoformat()}")
        return ca
    why = "its signature does not verify under any of them" if named else \
        f"issuer {cert.issuer.rfc4514_string()} is none of them"
    raise FactoryTrustError(meter, f"not signed by a registered factory CA of the vendor: {why}")


def _names_title(cert: x509.Certificate, system_title: str) -> bool:
    wanted = system_title.upper()
    values = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    values += [a.value for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    return any(isinstance(v, str) and v.upper() == wanted for v in values)


def verify_factory_certificate(meter: str, system_title: str, suite: int, der: bytes,
                               factory_cas: Sequence[bytes | x509.Certificate],
                               now: datetime) -> x509.Certificate:
    """Verify a meter's factory certificate (rules 1-5 above); return it parsed.

    ``factory_cas`` are the vendor's registered factory CA certificates (DER, or parsed: a
    caller verifying many meters parses them once, and each CA's key is loaded once).

    Raises:
        FactoryTrustError: naming the meter and the first rule the certificate breaks.
    """
    curve = SUITES[suite].curve if suite in SUITES else None
    if curve is None:
        raise FactoryTrustError(meter, f"suite {suite} meters carry no factory certificate")
    cert = _load(der, meter)
    _issuer(cert, [x509.load_der_x509_certificate(ca) if isinstance(ca, bytes) else ca
                   for ca in factory_cas], meter, now)
    if not _valid_at(cert, now):
        state = "expired" if now > cert.not_valid_after_utc else "not yet valid"
        raise FactoryTrustError(meter, f"{state} at {now.isoformat()} (valid "
                                       f"{cert.not_valid_before_utc:%Y-%m-%d} to "
                                       f"{cert.not_valid_after_utc:%Y-%m-%d})")
    usage = _extension(cert, x509.KeyUsage)
    if _is_ca(cert) or not isinstance(usage, x509.KeyUsage) or \
            not (usage.digital_signature or usage.key_agreement):
        raise FactoryTrustError(meter, "key usage allows neither digitalSignature nor "
                                       "keyAgreement of an end entity")
    if not _names_title(cert, system_title):
        raise FactoryTrustError(meter, f"subject {cert.subject.rfc4514_string()} does not name "
                                       f"system title {system_title}")
    public = cert.public_key()
    found = curve_of(public) if isinstance(public, ec.EllipticCurvePublicKey) else \
        type(public).__name__
    if found != curve:
        raise FactoryTrustError(meter, f"key on {found}; suite {suite} needs {curve}")
    return cert


# --- which registered factory CAs the audit trail attests ------------------------------------
@dataclass(frozen=True)
class RegisteredCa:
    """A ``vendor_ca`` row as the trail check sees it: its vendor's name, its fingerprint and
    subject columns, and its certificate (DER)."""

    vendor: str
    fingerprint: str
    subject: str
    der: bytes
    unsigned: str | None = None  # why its signed registration does not prove it (None: it does)

    @property
    def what(self) -> str:
        """Name the row by its certificate's real fingerprint (not the column) and vendor."""
        return f"factory CA SHA-256 {hashlib.sha256(self.der).hexdigest()[:PREFIX]}… of " \
               f"{self.vendor}"


def check_registered(row: RegisteredCa, registrations: Sequence[Mapping[str, Any]]) -> None:
    """Accept a factory CA row only if its signed registration proves it (``row.unsigned`` is
    None) and a registration event of the audit trail names it.

    ``registrations`` are the details of the trail's successful ``vendor.add-ca`` events. The
    row's certificate must hash to its fingerprint column and carry its subject column, and an
    event must register it for this vendor: same SHA-256 prefix, subject and notAfter.

    Raises:
        PkiError: naming the row (fingerprint prefix of its DER, vendor) and what is wrong.
    """
    if row.unsigned is not None:
        raise PkiError(row.what, row.unsigned)
    digest = hashlib.sha256(row.der).hexdigest()
    if digest != row.fingerprint:
        raise PkiError(row.what, f"its fingerprint column ({row.fingerprint[:PREFIX]}…) is "
                                 "not its certificate's: the row was altered")
    try:
        cert = x509.load_der_x509_certificate(row.der)
    except ValueError:
        raise PkiError(row.what, "not a DER X.509 certificate") from None
    subject = cert.subject.rfc4514_string()
    if subject != row.subject:
        raise PkiError(row.what, "its subject column is not its certificate's subject")
    named = [r for r in registrations if r.get("sha256_prefix") == digest[:PREFIX]]
    if not named:
        raise PkiError(row.what, f"no {REGISTRATION} event in the audit trail registers it "
                                 "(planted in the inventory?)")
    if not any(r.get("vendor") == row.vendor for r in named):
        raise PkiError(row.what, f"the audit trail registered it for "
                                 f"{', '.join(sorted({str(r.get('vendor')) for r in named}))}")
    after = cert.not_valid_after_utc.isoformat()
    if not any(r.get("vendor") == row.vendor and r.get("subject") == subject
               and r.get("not_after") == after for r in named):
        raise PkiError(row.what, f"its subject or notAfter differ from its {REGISTRATION} "
                                 "event")


@dataclass(frozen=True)
class Anchors:
    """A vendor's factory CA certificates: those the audit trail attests (DER), and the rows it
    does not, each with why (DER, reason)."""

    trusted: tuple[bytes, ...] = ()
    refused: tuple[tuple[bytes, str], ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        # Sent to HSM workers by pickle; parsed certificates do not pickle (nor need to).
        return {"trusted": self.trusted, "refused": self.refused}

    @functools.cached_property
    def parsed(self) -> tuple[x509.Certificate, ...]:
        """The attested CAs, parsed once for all the meters they verify."""
        return tuple(x509.load_der_x509_certificate(der) for der in self.trusted)

    def verify(self, meter: str, system_title: str, suite: int, der: bytes,
               now: datetime) -> x509.Certificate:
        """Verify a meter's factory certificate against the attested CAs only
        (``verify_factory_certificate``); return it parsed.

        Raises:
            FactoryTrustError: as ``verify_factory_certificate``; one issued by a refused row
                names that row and why it is refused.
        """
        try:
            return verify_factory_certificate(meter, system_title, suite, der,
                                              self.parsed, now)
        except FactoryTrustError:
            why = self._refused_issuer(der)
            if why is None:
                raise
            raise FactoryTrustError(meter, f"issued by a factory CA the audit trail does not "
                                           f"attest: {why}") from None

    def _refused_issuer(self, der: bytes) -> str | None:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        for ca_der, why in self.refused:
            try:
                cert.verify_directly_issued_by(x509.load_der_x509_certificate(ca_der))
            except (InvalidSignature, ValueError, TypeError):
                continue
            return why
        return None


@dataclass(frozen=True)
class FactoryCheck:
    """A suite 1/2 meter whose factory certificate is to verify (``certificate``: base64 DER,
    as the inventory holds it)."""

    serial: str
    system_title: str
    suite: int
    vendor_id: int
    certificate: str | None


@dataclass(frozen=True)
class FactoryCheckJob:
    """``check_factory_job``'s argument: the meters, their vendors' anchors and the clock."""

    meters: tuple[FactoryCheck, ...]
    anchors: dict[int, Anchors]
    now: datetime


def factory_refusal(meter: FactoryCheck, cas: Anchors, now: datetime) -> str | None:
    """Why a meter's factory certificate is refused (None: it verifies against ``cas``)."""
    if not cas.trusted and not cas.refused:
        return "factory certificate refused: its vendor has no registered factory CA " \
               "(meterkeys vendor add-ca)"
    try:
        der = base64.b64decode(meter.certificate or "", validate=True)
        cas.verify(meter.serial, meter.system_title, meter.suite, der, now)
    except binascii.Error:
        return "factory certificate refused: not base64"
    except FactoryTrustError as exc:
        return f"factory certificate refused: {exc.reason}"
    return None


def check_factory_job(_settings: Settings, job: FactoryCheckJob) -> list[str | None]:
    """Each meter's refusal (``factory_refusal``), in order: an ``HsmWorkers`` job."""
    return [factory_refusal(m, job.anchors.get(m.vendor_id, Anchors()), job.now)
            for m in job.meters]


def anchors(rows: Sequence[RegisteredCa],
            registrations: Sequence[Mapping[str, Any]]) -> Anchors:
    """Sort one vendor's rows into attested and refused (``check_registered``)."""
    trusted: list[bytes] = []
    refused: list[tuple[bytes, str]] = []
    for row in rows:
        try:
            check_registered(row, registrations)
        except PkiError as exc:
            refused.append((row.der, str(exc)))
            continue
        trusted.append(row.der)
    return Anchors(tuple(trusted), tuple(refused))


def unregistered(rows: Sequence[RegisteredCa],
                 registrations: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return a problem line for each row the trail does not attest and for each registration
    whose certificate has no row left (a deleted CA: its meters can no longer be claimed)."""
    problems = [why for _, why in anchors(rows, registrations).refused]
    held = {(row.vendor, hashlib.sha256(row.der).hexdigest()[:PREFIX]) for row in rows}
    for r in registrations:
        if isinstance(r.get("sha256_prefix"), str) and \
                (r.get("vendor"), r.get("sha256_prefix")) not in held:
            problems.append(f"factory CA SHA-256 {r.get('sha256_prefix')}… of "
                            f"{r.get('vendor')}: registered in the audit trail, but no "
                            "vendor_ca row holds it (deleted?)")
    return problems


__all__ = ["FACTORY_CA_CURVES", "PREFIX", "REGISTRATION", "Anchors", "RegisteredCa", "anchors",
           "check_factory_ca", "check_registered", "unregistered", "verify_factory_certificate"]
