"""A meter's certificate requests (PKCS#10), checked before the DSO certifies its keys.

After the claim a suite 1 or 2 meter makes a key pair per use (DLMS Security Setup, class id
64 version 1, method 4 ``generate_key_pair``) and a PKCS#10 request for it (method 5
``generate_certificate_request``; Blue Book DLMS UA 1000-1 §4.4.7, Green Book DLMS UA 1000-2
§9.2.6 for the certificate it asks for). The request comes over the HES, after the DSO's keys
are proven on the meter, so nobody holding the factory keys can answer for it. Before a device
CA signs anything, each request must show:

1. it parses as a DER PKCS#10 request and its self-signature verifies (RFC 2986 §3: proof of
   possession of the private key);
2. its subject is exactly one CN, the meter's system title (Green Book §9.2.6: the device
   certificate's subject names the system title);
3. its key is an EC key on the suite's curve (P-256 for suite 1, P-384 for suite 2);
4. if it carries a keyUsage extension, it asks for the use it is requested for and no other
   (digitalSignature for the signature key, keyAgreement for the key-agreement key).

``check_request`` raises ``ClaimError`` naming the meter and the rule broken; it returns the
key's SubjectPublicKeyInfo (DER), which is all the device CA takes from the request.
``certify_job`` checks a batch of meters' requests and certifies those that pass in one HSM
worker job, so the checks run in parallel with the signing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lifecycle.config import Settings
from lifecycle.errors import ClaimError
from lifecycle.pki import profiles
from lifecycle.pki.issuing import DeviceRequest, Issued, IssueJob, Issuer, curve_of, issue_job
from lifecycle.policy import SUITES

_USAGE_FLAG = {profiles.SIGNATURE: "digital_signature",
               profiles.KEY_AGREEMENT: "key_agreement"}
_FLAGS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
          "key_agreement", "key_cert_sign", "crl_sign")


def check_request(serial: str, system_title: str, suite: int, usage: str, der: bytes) -> bytes:
    """Check a meter's certificate request for ``usage`` (rules 1-4); return its public key as
    a DER SubjectPublicKeyInfo.

    Raises:
        ClaimError: naming the meter, the use and the first rule the request breaks.
    """
    where = f"meter {serial}"
    curve = SUITES[suite].curve if suite in SUITES else None
    if curve is None or usage not in _USAGE_FLAG:
        raise ClaimError(where, f"suite {suite} meters get no {usage} certificate")
    try:
        request = x509.load_der_x509_csr(der)
    except ValueError:
        raise ClaimError(where, f"{usage} request is not a DER PKCS#10 request") from None
    public = request.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or curve_of(public) != curve:
        found = curve_of(public) if isinstance(public, ec.EllipticCurvePublicKey) else \
            type(public).__name__
        raise ClaimError(where, f"{usage} request key is on {found}; suite {suite} needs {curve}")
    if not request.is_signature_valid:
        raise ClaimError(where, f"{usage} request signature does not verify (no proof of "
                                "possession)")
    _check_subject(where, usage, request.subject, system_title)
    _check_usage(where, usage, request)
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_subject(where: str, usage: str, subject: x509.Name, system_title: str) -> None:
    names = [a.value for a in subject]
    common = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or len(common) != 1 or common[0].value != system_title.upper():
        raise ClaimError(where, f"{usage} request subject {subject.rfc4514_string()!r} is not "
                                f"CN={system_title.upper()} (the meter's system title)")


def _check_usage(where: str, usage: str, request: x509.CertificateSigningRequest) -> None:
    try:
        asked = request.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    wanted = _USAGE_FLAG[usage]
    flags = {name for name in _FLAGS if getattr(asked, name)}
    if flags != {wanted}:
        raise ClaimError(where, f"{usage} request asks for key usage "
                                f"{', '.join(sorted(flags)) or 'none'}, not {wanted} alone")


@dataclass(frozen=True)
class MeterRequests:
    """A meter's two certificate requests as its HES returned them (DER PKCS#10, unchecked)."""

    serial: str
    system_title: str
    suite: int
    signature: bytes
    key_agreement: bytes


@dataclass(frozen=True)
class CertifyJob:
    """``certify_job``'s argument: the device CA, the meters' requests and the clock."""

    issuer: Issuer
    meters: tuple[MeterRequests, ...]
    now: datetime


@dataclass(frozen=True)
class Certified:
    """What a ``certify_job`` did: the certificates issued, and each refused meter's reason."""

    issued: list[Issued]
    refused: dict[str, str]


def device_requests(meter: MeterRequests) -> list[DeviceRequest]:
    """Check a meter's two requests (``check_request``); return what the device CA certifies.

    Raises:
        ClaimError: a request breaks a rule (naming the meter, the use and the rule).
    """
    return [DeviceRequest(meter.system_title, check_request(
        meter.serial, meter.system_title, meter.suite, usage, der), usage, meter.serial)
        for usage, der in zip(profiles.USAGES, (meter.signature, meter.key_agreement),
                              strict=True)]


def certify_job(settings: Settings, job: CertifyJob) -> Certified:
    """Check the meters' requests and certify the keys of those that pass, in this process (an
    ``HsmWorkers`` job: the checks, which verify each request's signature, run in the workers
    beside the signing instead of in the flow's process).

    Raises:
        KeyPolicyError, PkiError, HsmError: as ``lifecycle.pki.issuing.issue_job``.
    """
    wanted: list[DeviceRequest] = []
    refused: dict[str, str] = {}
    for meter in job.meters:
        try:
            wanted += device_requests(meter)
        except ClaimError as exc:
            refused[meter.serial] = exc.reason
    issued = issue_job(settings, IssueJob(job.issuer, tuple(wanted), job.now)) if wanted else []
    return Certified(issued, refused)
