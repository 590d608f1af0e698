"""Device TBS certificates of a batch: the fields replaced in the batch's first TBS give the
same bytes as ``cryptography`` building each certificate whole."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle.errors import PkiError
from lifecycle.pki import profiles, signing
from lifecycle.pki.issuing import DeviceRequest, DeviceTbs, Issuer

NOW = datetime(2027, 3, 1, 12, 0, 0, tzinfo=UTC)
DSO = "Test DSO"
CURVES = {"P-256": (ec.SECP256R1, profiles.DEVICE_P256),
          "P-384": (ec.SECP384R1, profiles.DEVICE_P384)}


def _issuer(curve: str) -> tuple[Issuer, profiles.IssuerFacts]:
    """A device CA of ``curve`` under a root, built with software keys (no HSM: pure DER)."""
    kind, name = CURVES[curve]
    root_key, ca_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(kind())
    root = profiles.ca_builder(DSO, profiles.CAS[profiles.ROOT], 1, root_key.public_key(), None,
                               profiles.new_serial(), NOW).sign(root_key, hashes.SHA384())
    ca = profiles.ca_builder(DSO, profiles.CAS[name], 1, ca_key.public_key(),
                             profiles.IssuerFacts.of(root, "http://pki.invalid/root-1.crl"),
                             profiles.new_serial(), NOW).sign(root_key, hashes.SHA384())
    url = f"http://pki.invalid/{name}-1.crl"
    return (Issuer(name, 1, curve, "dev", ca.public_bytes(serialization.Encoding.DER), url, DSO),
            profiles.IssuerFacts.of(ca, url))


def _whole(issuer: Issuer, facts: profiles.IssuerFacts, request: DeviceRequest,
           public: ec.EllipticCurvePublicKey, serial: int) -> bytes:
    return signing.certificate_tbs(profiles.device_builder(
        DSO, facts, request.system_title, request.usage, public, serial, NOW), issuer.curve)


def _serials(count: int) -> list[int]:
    # Mostly 159-bit serials (20 octets); every seventh one short (the builder's path).
    return [secrets.randbits(140) | 1 if i % 7 == 3 else profiles.new_serial()
            for i in range(count)]


@pytest.mark.parametrize("curve", list(CURVES))
def test_a_batch_gives_the_bytes_of_certificates_built_whole(curve: str) -> None:
    issuer, facts = _issuer(curve)
    make = DeviceTbs(issuer, facts, NOW)
    kind = CURVES[curve][0]
    for i, serial in enumerate(_serials(60)):
        public = ec.generate_private_key(kind()).public_key()
        usage = profiles.USAGES[i % 2]
        request = DeviceRequest(secrets.token_hex(8).upper(), b"", usage, f"S{i}")
        tbs = make.tbs(request, public, serial)
        assert tbs == _whole(issuer, facts, request, public, serial), (i, usage, serial)
    # and the replaced fields are where a parser finds them
    signed = x509.load_der_x509_certificate(signing.assemble(tbs, curve, bytes(
        2 * (32 if curve == "P-256" else 48))))
    assert signed.serial_number == serial
    assert signed.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == \
        request.system_title
    assert signed.public_key() == public


def test_the_template_is_used_after_the_first_certificate_of_a_use() -> None:
    issuer, facts = _issuer("P-256")
    make = DeviceTbs(issuer, facts, NOW)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    first = DeviceRequest("4D4B530000000001", b"", profiles.SIGNATURE)
    make.tbs(first, key, (1 << 158) | 5)
    # A throw-away signature is what building whole costs; the template path makes none.
    calls = []
    real = signing.certificate_tbs
    try:
        signing.certificate_tbs = lambda *a: calls.append(a) or real(*a)  # type: ignore[assignment]
        make.tbs(DeviceRequest("4D4B530000000002", b"", profiles.SIGNATURE), key, (1 << 158) | 7)
    finally:
        signing.certificate_tbs = real  # type: ignore[assignment]
    assert calls == []


def test_a_malformed_title_is_refused_after_the_template_too() -> None:
    issuer, facts = _issuer("P-256")
    make = DeviceTbs(issuer, facts, NOW)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    make.tbs(DeviceRequest("4D4B530000000001", b"", profiles.SIGNATURE), key, (1 << 158) | 5)
    for title in ("4d4b530000000002", "4D4B53000000000G", "4D4B5300000000"):
        with pytest.raises(PkiError, match="16 upper-case hex"):
            make.tbs(DeviceRequest(title, b"", profiles.SIGNATURE), key, (1 << 158) | 9)
