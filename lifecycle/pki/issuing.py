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
    start = now.replace(microsecond=0)
    make = DeviceTbs(issuer, profiles.IssuerFacts.of(cert, issuer.crl_url), start)
    serials, tbs = [], []
    for request in requests:
        serial = profiles.new_serial()
        serials.append(serial)
        tbs.append(make.tbs(request, _public(request, issuer.curve), serial))
    ders = signing.sign_certificates(signer, issuer.key_label, issuer.curve, tbs, cert)
    end = start + profiles.policy.DEVICE_CERT_VALIDITY
    return [Issued(serial, r.system_title, r.usage, r.meter_serial, start, end, der)
            for serial, r, der in zip(serials, requests, ders, strict=True)]


def _full_length(serial: int) -> bool:
    """Whether a serial's DER content is 20 octets (a template's length)."""
    return serial.bit_length() > 152


@dataclass(frozen=True)
class _Template:
    """A device TBS of one batch and use, and where its per-meter fields lie in it."""

    tbs: bytes
    serial_at: int  # the serial's 20 content octets
    title_at: int  # the system title's 16 characters (subject CN)
    spki_at: int  # the SubjectPublicKeyInfo
    spki_len: int
    ski_at: int  # the subject key identifier's 20 octets

    @classmethod
    def find(cls, tbs: bytes, serial: int, title: str, spki: bytes,
             ski: bytes) -> _Template | None:
        """Locate the fields in a TBS built for them; None when one is not there exactly once
        (the batch then builds each TBS whole)."""
        marks = [b"\x02\x14" + serial.to_bytes(20, "big"), b"\x0c\x10" + title.encode("ascii"),
                 spki, b"\x04\x14" + ski]
        if not _full_length(serial) or any(tbs.count(m) != 1 for m in marks):
            return None
        serial_at, title_at, spki_at, ski_at = (tbs.index(m) + len(m) - n for m, n in
                                                zip(marks, (20, 16, len(spki), 20), strict=True))
        return cls(tbs, serial_at, title_at, spki_at, len(spki), ski_at)

    def fits(self, serial: int, title: str, spki: bytes) -> bool:
        """Whether these fields have the template's lengths (and the title is well formed)."""
        return _full_length(serial) and bool(profiles.SYSTEM_TITLE.fullmatch(title)) \
            and len(spki) == self.spki_len

    def fill(self, serial: int, title: str, spki: bytes, ski: bytes) -> bytes:
        """Return the TBS with these fields (each of the template's own length)."""
        out = bytearray(self.tbs)
        out[self.serial_at:self.serial_at + 20] = serial.to_bytes(20, "big")
        out[self.title_at:self.title_at + 16] = title.encode("ascii")
        out[self.spki_at:self.spki_at + self.spki_len] = spki
        out[self.ski_at:self.ski_at + 20] = ski
        return bytes(out)


class DeviceTbs:
    """The TBS certificates of one batch (one issuer, one validity start).

    Within a batch, two device certificates of the same use differ only in their serial,
    subject CN (the system title, 16 characters), public key (SubjectPublicKeyInfo, one length
    per curve) and subject key identifier (SHA-1 of the public key, RFC 5280 §4.2.1.2 method
    1): every length in the DER stays the same. So the first certificate of each use is built
    by ``profiles.device_builder`` and ``cryptography`` (which also signs it with a throw-away
    key to produce its TBS); the others are that TBS with these four fields replaced: about
    18 µs of processor time a certificate here instead of 130. A serial of fewer than 20
    octets (1 in 128) is built whole. ``tests/unit/pki/test_issuing.py`` checks the two ways
    give the same bytes.
    """

    def __init__(self, issuer: Issuer, facts: profiles.IssuerFacts, start: datetime) -> None:
        self.issuer, self.facts, self.start = issuer, facts, start
        self._templates: dict[str, _Template | None] = {}

    def tbs(self, request: DeviceRequest, public: ec.EllipticCurvePublicKey,
            serial: int) -> bytes:
        """Return the DER TBSCertificate of ``request``'s certificate with this serial.

        Raises:
            PkiError: an unknown usage or a malformed system title.
        """
        title = request.system_title
        spki = public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        ski = x509.SubjectKeyIdentifier.from_public_key(public).digest
        template = self._templates.get(request.usage)
        if template is not None and template.fits(serial, title, spki):
            return template.fill(serial, title, spki, ski)
        builder = profiles.device_builder(self.issuer.dso, self.facts, title, request.usage,
                                          public, serial, self.start)
        tbs = signing.certificate_tbs(builder, self.issuer.curve)
        if request.usage not in self._templates:
            self._templates[request.usage] = _Template.find(tbs, serial, title, spki, ski)
        return tbs


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
