"""Device certificates issued in bulk: an HSM job on plain data, usable in any HSM worker.

``issue_device_certificates`` takes an ``Issuer`` (which CA key, its certificate, its CRL URL),
the requests (system title, public key, usage) and the clock, and returns DER and serials: no
key ever crosses, and the whole batch is signed in one HSM session under one lock hold.
``issue_job`` is its module-level form for ``lifecycle.hsm.pool.HsmWorkers``: the worker checks
the CA key's pin (CKA_ID, public key) once before its first signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle.config import Settings
from lifecycle.errors import PkiError
from lifecycle.hsm.check import verify_pins
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.pki import profiles, signing

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384"}


@dataclass(frozen=True)
class Issuer:
    """A CA generation as a job needs it: plain, picklable data, no key."""

    ca_name: str
    generation: int
    curve: str
    key_label: str
    cert_der: bytes
    crl_url: str
    dso: str
    pin: KeyPin | None = None  # the key's pin, checked by a worker before it signs


@dataclass(frozen=True)
class DeviceRequest:
    """One meter key to certify: its system title, SubjectPublicKeyInfo (DER) and usage."""

    system_title: str
    public_key_der: bytes
    usage: str  # profiles.SIGNATURE | profiles.KEY_AGREEMENT
    meter_serial: str | None = None


@dataclass(frozen=True)
class Issued:
    """A certificate issued: its serial, dates and DER, and what it was for."""

    serial: int
    system_title: str
    usage: str
    meter_serial: str | None
    not_before: datetime
    not_after: datetime
    der: bytes


def curve_of(public: ec.EllipticCurvePublicKey) -> str:
    """Return the curve name (P-256, P-384) of an EC public key, or its own name if other."""
    return _CURVE_NAMES.get(public.curve.name, public.curve.name)


def _public(request: DeviceRequest, curve: str) -> ec.EllipticCurvePublicKey:
    try:
        public = serialization.load_der_public_key(request.public_key_der)
    except ValueError:
        raise PkiError(f"meter {request.system_title}", "the public key is not a DER "
                                                        "SubjectPublicKeyInfo") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or curve_of(public) != curve:
        raise PkiError(f"meter {request.system_title}", f"the {request.usage} key is not an EC "
                                                        f"key on {curve}, the CA's curve")
    return public


def issue_device_certificates(signer: signing.DigestSigner, issuer: Issuer,
                              requests: Sequence[DeviceRequest], now: datetime) -> list[Issued]:
    """Build, sign (one HSM call for the batch) and verify a certificate per request.

    Validity starts at ``now`` (to the second) and lasts ``policy.DEVICE_CERT_VALIDITY``.

    Raises:
        PkiError: a request's key is not on the CA's curve, a system title is malformed, or a
            signature does not verify (naming the meter or the certificate).
        HsmError: the HSM refused to sign.
    """
    cert = x509.load_der_x509_certificate(issuer.cert_der)
    facts = profiles.IssuerFacts.of(cert, issuer.crl_url)
    start = now.replace(microsecond=0)
    serials, tbs = [], []
    for request in requests:
        serial = profiles.new_serial()
        builder = profiles.device_builder(issuer.dso, facts, request.system_title,
                                          request.usage, _public(request, issuer.curve),
                                          serial, start)
        serials.append(serial)
        tbs.append(signing.certificate_tbs(builder, issuer.curve))
    ders = signing.sign_certificates(signer, issuer.key_label, issuer.curve, tbs, cert)
    end = start + profiles.policy.DEVICE_CERT_VALIDITY
    return [Issued(serial, r.system_title, r.usage, r.meter_serial, start, end, der)
            for serial, r, der in zip(serials, requests, ders, strict=True)]


@dataclass(frozen=True)
class IssueJob:
    """``issue_job``'s argument: the issuer, the requests and the clock."""

    issuer: Issuer
    requests: tuple[DeviceRequest, ...]
    now: datetime


_verified: set[KeyPin] = set()


def issue_job(settings: Settings, job: IssueJob) -> list[Issued]:
    """Issue a batch in this process's HSM session (an ``HsmWorkers`` job).

    Raises:
        KeyPolicyError: the CA key is not the pinned one or weaker than policy.
        PkiError, HsmError: as ``issue_device_certificates``.
    """
    pin = job.issuer.pin
    if pin is not None and pin not in _verified:
        verify_pins(settings, (pin,))
        _verified.add(pin)
    with Hsm.open(settings).session() as hs:
        return issue_device_certificates(hs, job.issuer, job.requests, job.now)


__all__ = ["DeviceRequest", "IssueJob", "Issued", "Issuer", "curve_of",
           "issue_device_certificates", "issue_job"]
