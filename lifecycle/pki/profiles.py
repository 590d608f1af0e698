"""What each certificate and CRL of the DSO's PKI holds (pure: no HSM, no inventory, no clock).

CAs (``CAS``), each an EC key in the HSM:

    root          P-384, self-signed, pathLen 1, keyCertSign + cRLSign; offline, its own token
    device-p256   P-256, pathLen 0: suite 1 meters' certificates   } online sub-CAs, keys in
    device-p384   P-384, pathLen 0: suite 2 meters' certificates   } the main token, signed by
    maintenance   P-256, pathLen 0: temporary-access certificates  } the root at a ceremony
    firmware      P-256, a leaf of the root: digitalSignature, EKU codeSigning

The firmware signing certificate is issued by the root itself, not by an online sub-CA: only a
ceremony (two security officers, the offline root) can then make a key that meters accept for
firmware, and a compromised online CA cannot; meters verify a chain of two.

Device certificates follow the DLMS/COSEM certificate profile (DLMS Green Book, IEC 62056-5-3
§9.2.6 "Certificate and certificate extension profile"): X.509 v3, ecdsa-with-SHA256 (suite 1)
or -SHA384 (suite 2); subject CN = the server's system title as 16 upper-case hex characters
(O = the DSO); one certificate per key usage, digitalSignature for the signing key and
keyAgreement for the ECDH key; authority and subject key identifiers; keyUsage critical; a CRL
distribution point. Serial numbers are 159 random bits (RFC 5280 §4.1.2.2).

Builders are returned unsigned: ``lifecycle.pki.signing`` signs their TBS in the HSM.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lifecycle import policy
from lifecycle.errors import PkiError

ROOT, DEVICE_P256, DEVICE_P384, MAINTENANCE, FIRMWARE = (
    "root", "device-p256", "device-p384", "maintenance", "firmware")
SIGNATURE, KEY_AGREEMENT = "signature", "key-agreement"
USAGES = (SIGNATURE, KEY_AGREEMENT)
SYSTEM_TITLE = re.compile(r"[0-9A-F]{16}")
CURVES: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
HASHES: dict[str, type[hashes.SHA256] | type[hashes.SHA384]] = {
    "P-256": hashes.SHA256, "P-384": hashes.SHA384}  # Green Book suites 1 and 2
# The device CA of each DLMS security suite (lifecycle.policy.SUITES: its curve).
DEVICE_CA_OF_CURVE = {"P-256": DEVICE_P256, "P-384": DEVICE_P384}


@dataclass(frozen=True)
class CaProfile:
    """One CA (or the firmware signer): its kind, curve, constraints and validity."""

    name: str
    kind: str  # root | device | maintenance | firmware
    curve: str
    title: str  # the common name's wording, after the DSO's name
    path_length: int | None  # None: not a CA (the firmware signer)
    validity: timedelta

    @property
    def is_ca(self) -> bool:
        return self.path_length is not None


CAS: dict[str, CaProfile] = {p.name: p for p in (
    CaProfile(ROOT, "root", "P-384", "root CA", 1, policy.ROOT_CA_VALIDITY),
    CaProfile(DEVICE_P256, "device", "P-256", "device CA P-256", 0, policy.SUB_CA_VALIDITY),
    CaProfile(DEVICE_P384, "device", "P-384", "device CA P-384", 0, policy.SUB_CA_VALIDITY),
    CaProfile(MAINTENANCE, "maintenance", "P-256", "maintenance CA", 0, policy.SUB_CA_VALIDITY),
    CaProfile(FIRMWARE, "firmware", "P-256", "firmware signing", None,
              policy.FIRMWARE_CERT_VALIDITY),
)}
ONLINE = (DEVICE_P256, DEVICE_P384, MAINTENANCE, FIRMWARE)  # keys in the main token


def profile(name: str) -> CaProfile:
    """Return the profile of a CA by name.

    Raises:
        PkiError: no such CA.
    """
    if name not in CAS:
        raise PkiError(f"CA {name!r}", f"unknown; the CAs are {', '.join(CAS)}")
    return CAS[name]


def new_key_label(name: str, generation: int) -> str:
    """Return a fresh HSM label for a CA's key of one generation (renewal makes a new key).

    A random tag keeps labels apart on a token that serves several inventories (tests, a
    rebuilt inventory): the inventory's pin, not the label, says which key a CA uses.
    """
    return f"meterkeys-ca-{name}-{generation}-{secrets.token_hex(3)}"


def root_key_label() -> str:
    """Return the label of the root key: fixed, so that a ceremony that failed after making
    the key (before its certificate was stored) finds and reuses it instead of leaving an
    orphan root key in the root token, which is the root's alone."""
    return f"meterkeys-ca-{ROOT}-1"


def key_role(name: str, generation: int) -> str:
    """Return the role under which a CA key is pinned (``lifecycle.hsm.keyring``)."""
    return f"ca:{name}:{generation}"


def crl_url(base: str, name: str, generation: int) -> str:
    """Return the CRL distribution point of a CA generation: ``<base><name>-<generation>.crl``.

    Each key has a CRL of its own: a renewed CA's old key still signs the CRL of what it issued.
    """
    return f"{base if base.endswith('/') else base + '/'}{name}-{generation}.crl"


def new_serial() -> int:
    """Return a positive random serial number of at most 159 bits (RFC 5280 §4.1.2.2)."""
    return secrets.randbits(policy.SERIAL_BITS) or 1


def serial_b64(serial: int) -> str:
    """Return a serial number as unpadded base64url of its 20 octets (27 characters), as the
    audit trail records it (its decimal or hex form would look like key material there)."""
    return base64.urlsafe_b64encode(serial.to_bytes(20, "big")).rstrip(b"=").decode("ascii")


def parse_serial(text: str) -> int:
    """Return a serial number given in decimal, or in hex (``0x`` prefix, or colon-separated
    octets as openssl prints it).

    Raises:
        PkiError: not a serial number.
    """
    cleaned = text.strip().lower()
    try:
        if cleaned.startswith("0x"):
            return int(cleaned[2:], 16)
        if ":" in cleaned:
            return int(cleaned.replace(":", ""), 16)
        return int(cleaned, 10)
    except ValueError:
        raise PkiError(f"serial {text!r}", "not a decimal or hex serial number") from None


def ca_name(dso: str, ca: CaProfile, generation: int) -> x509.Name:
    """Return the subject of a CA certificate: O = the DSO, CN = DSO, title and generation."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, dso),
                      x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"{dso} {ca.title} G{generation}")])


def device_name(dso: str, system_title: str) -> x509.Name:
    """Return a device certificate's subject (Green Book §9.2.6: CN = the system title).

    Raises:
        PkiError: the system title is not 16 upper-case hex characters.
    """
    if not SYSTEM_TITLE.fullmatch(system_title):
        raise PkiError(f"system title {system_title!r}", "must be 16 upper-case hex characters")
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, dso),
                      x509.NameAttribute(NameOID.COMMON_NAME, system_title)])


def _key_usage(*, signature: bool = False, agreement: bool = False,
               ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=agreement, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _crl_point(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints([x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)], relative_name=None, reasons=None,
        crl_issuer=None)])


@dataclass(frozen=True)
class IssuerFacts:
    """What a certificate takes from its issuer: its name, key identifier and CRL URL."""

    name: x509.Name
    key_identifier: x509.AuthorityKeyIdentifier
    crl_url: str | None  # None: the root's own certificate (self-signed)

    @classmethod
    def of(cls, cert: x509.Certificate, crl_url: str | None) -> IssuerFacts:
        """Return the facts of an issuer's certificate (its SKI becomes the AKI)."""
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return cls(cert.subject, x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ski), crl_url)


def ca_builder(dso: str, ca: CaProfile, generation: int, public: ec.EllipticCurvePublicKey,
               issuer: IssuerFacts | None, serial: int,
               not_before: datetime) -> x509.CertificateBuilder:
    """Return the unsigned certificate of a CA generation (``issuer`` None: self-signed root).

    RFC 5280 §4.2.1.9 basicConstraints critical with the CA's path length, §4.2.1.3 keyUsage
    critical (keyCertSign, cRLSign); the firmware signer gets digitalSignature and EKU
    codeSigning (§4.2.1.12) instead. SKI always, AKI and the root's CRL on sub-CAs.
    """
    subject = ca_name(dso, ca, generation)
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(subject if issuer is None else issuer.name)
               .public_key(public).serial_number(serial)
               .not_valid_before(not_before).not_valid_after(not_before + ca.validity))
    if ca.is_ca:
        builder = (builder
                   .add_extension(x509.BasicConstraints(ca=True, path_length=ca.path_length),
                                  critical=True)
                   .add_extension(_key_usage(ca=True), critical=True))
    else:
        builder = (builder
                   .add_extension(_key_usage(signature=True), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
                                  critical=False))
    builder = builder.add_extension(ski, critical=False)
    if issuer is not None:
        builder = builder.add_extension(issuer.key_identifier, critical=False)
        if issuer.crl_url is not None:
            builder = builder.add_extension(_crl_point(issuer.crl_url), critical=False)
    return builder


def device_builder(dso: str, issuer: IssuerFacts, system_title: str, usage: str,
                   public: ec.EllipticCurvePublicKey, serial: int,
                   not_before: datetime) -> x509.CertificateBuilder:
    """Return the unsigned certificate of one meter key (Green Book §9.2.6).

    Raises:
        PkiError: an unknown usage or a malformed system title.
    """
    if usage not in USAGES:
        raise PkiError(f"device certificate for {system_title}", f"unknown usage {usage!r}")
    assert issuer.crl_url is not None
    return (x509.CertificateBuilder().subject_name(device_name(dso, system_title))
            .issuer_name(issuer.name).public_key(public).serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_before + policy.DEVICE_CERT_VALIDITY)
            .add_extension(_key_usage(signature=usage == SIGNATURE,
                                      agreement=usage == KEY_AGREEMENT), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(issuer.key_identifier, critical=False)
            .add_extension(_crl_point(issuer.crl_url), critical=False))


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate as a CRL lists it."""

    serial: int
    at: datetime
    reason: x509.ReasonFlags


# RFC 5280 §5.3.1 reason codes a DSO uses; "unspecified" is listed without a reasonCode entry
# extension (RFC 5280: the reason code unspecified SHOULD be absent).
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "ca-compromise": x509.ReasonFlags.ca_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
}


def reason(name: str) -> x509.ReasonFlags:
    """Return the RFC 5280 reason flag of a reason name.

    Raises:
        PkiError: an unknown reason.
    """
    if name not in REASONS:
        raise PkiError(f"revocation reason {name!r}", f"unknown; one of {', '.join(REASONS)}")
    return REASONS[name]


def crl_builder(issuer: IssuerFacts, number: int, this_update: datetime,
                next_update: datetime,
                revoked: list[Revoked]) -> x509.CertificateRevocationListBuilder:
    """Return an unsigned CRL (RFC 5280 §5): AKI and CRL number, each entry's reason code.

    Raises:
        PkiError: a CRL number that is not positive.
    """
    if number < 1:
        raise PkiError("CRL", f"number {number} must be positive")
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.name)
               .last_update(this_update).next_update(next_update)
               .add_extension(issuer.key_identifier, critical=False)
               .add_extension(x509.CRLNumber(number), critical=False))
    for entry in revoked:
        item = (x509.RevokedCertificateBuilder().serial_number(entry.serial)
                .revocation_date(entry.at))
        if entry.reason is not x509.ReasonFlags.unspecified:
            item = item.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    return builder


__all__ = ["CAS", "DEVICE_CA_OF_CURVE", "FIRMWARE", "KEY_AGREEMENT", "MAINTENANCE", "ONLINE",
           "REASONS", "ROOT", "SIGNATURE", "USAGES", "CaProfile", "IssuerFacts", "Revoked",
           "ca_builder", "ca_name", "crl_builder", "crl_url", "device_builder", "device_name",
           "key_role", "new_key_label", "new_serial", "parse_serial", "profile", "reason",
           "root_key_label", "serial_b64"]
