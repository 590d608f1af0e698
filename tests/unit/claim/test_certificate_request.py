"""A meter's certificate requests checked before the DSO certifies its keys: a scenario table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from lifecycle.claim.certificate_request import check_request
from lifecycle.errors import ClaimError
from lifecycle.pki import profiles

TITLE = "4D4B530000000001"
SIG, AGREE = profiles.SIGNATURE, profiles.KEY_AGREEMENT


def usage_ext(signature: bool = False, agreement: bool = False,
              encipher: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(signature, False, encipher, False, agreement, False, False, False, False)


def request(curve: ec.EllipticCurve | None = None, names: list[x509.NameAttribute] | None = None,
            usage: x509.KeyUsage | None = None,
            key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(curve or ec.SECP256R1())
    names = names if names is not None else [x509.NameAttribute(NameOID.COMMON_NAME, TITLE)]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER)


def bad_signature() -> bytes:
    der = bytearray(request())
    der[-3] ^= 0x01  # inside the ECDSA signature's last integer
    return bytes(der)


GOOD: list[object] = [
    pytest.param(1, SIG, lambda: request(), id="suite-1-signature-no-key-usage"),
    pytest.param(1, AGREE, lambda: request(usage=usage_ext(agreement=True)),
                 id="suite-1-key-agreement"),
    pytest.param(2, SIG, lambda: request(ec.SECP384R1(), usage=usage_ext(signature=True)),
                 id="suite-2-signature"),
]


@pytest.mark.parametrize(("suite", "usage", "make"), GOOD)
def test_a_good_request_gives_its_public_key(suite: int, usage: str,
                                              make: Callable[[], bytes]) -> None:
    der = make()
    spki = check_request("M1", TITLE, suite, usage, der)
    assert spki == x509.load_der_x509_csr(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(("suite", "usage", "make", "reason"), [
    pytest.param(1, SIG, lambda: b"not a request", "not a DER PKCS#10", id="garbage"),
    pytest.param(0, SIG, lambda: request(), "suite 0 meters get no", id="suite-0"),
    pytest.param(1, "firmware", lambda: request(), "get no firmware", id="unknown-usage"),
    pytest.param(1, SIG, lambda: request(ec.SECP384R1()), "on P-384; suite 1 needs P-256",
                 id="wrong-curve"),
    pytest.param(2, SIG, lambda: request(), "on P-256; suite 2 needs P-384",
                 id="suite-2-on-p256"),
    pytest.param(1, SIG, lambda: request(key=ed25519.Ed25519PrivateKey.generate()),
                 "on Ed25519PublicKey", id="not-ec"),
    pytest.param(1, SIG, bad_signature, "signature does not verify", id="bad-signature"),
    pytest.param(1, SIG, lambda: request(names=[x509.NameAttribute(NameOID.COMMON_NAME,
                                                                   "4D4B530000000002")]),
                 "is not CN=4D4B530000000001", id="another-title"),
    pytest.param(1, SIG, lambda: request(names=[x509.NameAttribute(NameOID.COMMON_NAME,
                                                                   TITLE.lower())]),
                 "is not CN=", id="lower-case-title"),
    pytest.param(1, SIG, lambda: request(names=[
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
        x509.NameAttribute(NameOID.COMMON_NAME, TITLE)]), "is not CN=", id="extra-attribute"),
    pytest.param(1, SIG, lambda: request(names=[]), "is not CN=", id="empty-subject"),
    pytest.param(1, SIG, lambda: request(usage=usage_ext(agreement=True)),
                 "asks for key usage key_agreement, not digital_signature",
                 id="usage-of-the-other-key"),
    pytest.param(1, AGREE, lambda: request(usage=usage_ext(signature=True, agreement=True)),
                 "asks for key usage digital_signature, key_agreement", id="both-usages"),
    pytest.param(1, SIG, lambda: request(usage=usage_ext(signature=True, encipher=True)),
                 "key_encipherment", id="extra-usage"),
])
def test_a_bad_request_is_refused_with_its_reason(suite: int, usage: str,
                                                  make: Callable[[], bytes],
                                                  reason: str) -> None:
    with pytest.raises(ClaimError, match="meter M1") as info:
        check_request("M1", TITLE, suite, usage, make())
    assert reason in info.value.reason
