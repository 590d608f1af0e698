"""Certificates and CRLs signed in the HSM: TBS built in software, signature from the CA key.

``cryptography`` builds only signed objects, so a builder is signed once with a throw-away key
of the CA's curve (kept in this process's memory, never stored; its signature is discarded) and
its ``tbs_certificate_bytes`` / ``tbs_certlist_bytes`` kept: the TBS already names the
signature algorithm, ecdsa-with-SHA256 (P-256) or -SHA384 (P-384), as RFC 5480 §2.1 pairs them.
The TBS is hashed here, the digest signed in the HSM with CKM_ECDSA (raw r || s, PKCS#11 v2.40
§2.3.1), and the Certificate / CertificateList assembled in DER (RFC 5280 §4.1, §5.1):
SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING (Ecdsa-Sig-Value, RFC 5480 §2.2.3) }.
Every result is parsed back and verified under the CA's public key before it is returned:
a faulty signature never leaves this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from lifecycle.errors import PkiError
from lifecycle.pki.profiles import CURVES, HASHES

# AlgorithmIdentifier DER of ecdsa-with-SHA256 (1.2.840.10045.4.3.2) and -SHA384 (.3), no
# parameters (RFC 5758 §3.2).
SIGNATURE_ALGORITHMS = {
    "P-256": bytes.fromhex("300a06082a8648ce3d040302"),
    "P-384": bytes.fromhex("300a06082a8648ce3d040303"),
}
_DIGESTS = {"P-256": hashlib.sha256, "P-384": hashlib.sha384}
_THROWAWAY: dict[str, ec.EllipticCurvePrivateKey] = {}


class DigestSigner(Protocol):
    """What signs for a CA: ``lifecycle.hsm.session.HsmSession`` (or the root's worker)."""

    def sign_digests(self, label: str, digests: Sequence[bytes]) -> list[bytes]: ...


def _throwaway(curve: str) -> ec.EllipticCurvePrivateKey:
    key = _THROWAWAY.get(curve)
    if key is None:
        key = _THROWAWAY[curve] = ec.generate_private_key(CURVES[curve]())
    return key


def certificate_tbs(builder: x509.CertificateBuilder, curve: str) -> bytes:
    """Return the DER TBSCertificate of an unsigned certificate for a CA on ``curve``."""
    return builder.sign(_throwaway(curve), HASHES[curve]()).tbs_certificate_bytes


def crl_tbs(builder: x509.CertificateRevocationListBuilder, curve: str) -> bytes:
    """Return the DER TBSCertList of an unsigned CRL for a CA on ``curve``."""
    return builder.sign(_throwaway(curve), HASHES[curve]()).tbs_certlist_bytes


def digest(tbs: bytes, curve: str) -> bytes:
    """Return the hash of a TBS that the CA key signs (SHA-256 for P-256, SHA-384 for P-384)."""
    return _DIGESTS[curve](tbs).digest()


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _ecdsa_sig_value(curve: str, raw_signature: bytes) -> bytes:
    """Return the DER Ecdsa-Sig-Value of a raw r || s signature (RFC 5480 §2.2.3).

    Raises:
        PkiError: the raw signature is not r || s of the curve's size.
    """
    size = 32 if curve == "P-256" else 48
    if len(raw_signature) != 2 * size:
        raise PkiError("signature", f"{len(raw_signature)} bytes; an ECDSA {curve} signature "
                                    f"is {2 * size}")
    r = int.from_bytes(raw_signature[:size], "big")
    s = int.from_bytes(raw_signature[size:], "big")
    return encode_dss_signature(r, s)


def assemble(tbs: bytes, curve: str, raw_signature: bytes) -> bytes:
    """Return the DER of SEQUENCE { tbs, signatureAlgorithm, signatureValue } (RFC 5280).

    Raises:
        PkiError: the raw signature is not r || s of the curve's size.
    """
    signature = _ecdsa_sig_value(curve, raw_signature)
    bits = b"\x03" + _length(len(signature) + 1) + b"\x00" + signature
    body = tbs + SIGNATURE_ALGORITHMS[curve] + bits
    return b"\x30" + _length(len(body)) + body


def sign_certificates(signer: DigestSigner, label: str, curve: str,
                      tbs_list: Sequence[bytes], issuer: x509.Certificate | None) -> list[bytes]:
    """Sign TBS certificates with the CA key ``label``; return each certificate's DER, verified.

    ``issuer`` None: the certificates are self-signed (the root's), verified under their own key.

    Raises:
        PkiError: a signature does not verify under the issuer's key (the HSM signed with
            another key, or wrongly), or the issuer's name does not match.
        HsmError: the HSM refused to sign.
    """
    digests = [digest(tbs, curve) for tbs in tbs_list]
    raw = signer.sign_digests(label, digests)
    # The issuer's key checks each signature over the digest already made (Prehashed): the
    # same check as ``verify_directly_issued_by``, without hashing the TBS again.
    algorithm = ec.ECDSA(Prehashed(HASHES[curve]()))
    issuer_key = None if issuer is None else issuer.public_key()
    issuer_name = None if issuer is None else issuer.subject
    out = []
    for tbs, hashed, signature in zip(tbs_list, digests, raw, strict=True):
        der = assemble(tbs, curve, signature)
        cert = x509.load_der_x509_certificate(der)
        public = issuer_key or cert.public_key()
        try:
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise TypeError("the issuer's key is not an EC key")
            if cert.issuer != (issuer_name or cert.subject):
                raise ValueError("the issuer name is not the CA's subject")
            public.verify(_ecdsa_sig_value(curve, signature), hashed, algorithm)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise PkiError(f"certificate {cert.subject.rfc4514_string()}",
                           f"does not verify under CA key {label!r}: "
                           f"{type(exc).__name__}") from None
        out.append(der)
    return out


def sign_crl(signer: DigestSigner, label: str, curve: str, tbs: bytes,
             issuer: x509.Certificate) -> bytes:
    """Sign a TBS CRL with the CA key ``label``; return the CRL's DER, verified.

    Raises:
        PkiError: the signature does not verify under the issuer's key.
        HsmError: the HSM refused to sign.
    """
    (raw,) = signer.sign_digests(label, [digest(tbs, curve)])
    der = assemble(tbs, curve, raw)
    crl = x509.load_der_x509_crl(der)
    public = issuer.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public):
        raise PkiError(f"CRL of {issuer.subject.rfc4514_string()}",
                       f"does not verify under CA key {label!r}")
    return der


__all__ = ["SIGNATURE_ALGORITHMS", "DigestSigner", "assemble", "certificate_tbs", "crl_tbs",
           "digest", "sign_certificates", "sign_crl"]
