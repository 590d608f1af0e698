"""Certificate and CRL profiles (pure), and DER assembly with a software signer standing in for
the HSM: what the HSM path builds is what ``cryptography`` would have signed."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lifecycle import policy
from lifecycle.errors import PkiError
from lifecycle.pki import profiles, signing
from lifecycle.pki.issuing import DeviceRequest, issue_device_certificates
from lifecycle.pki.issuing import Issuer as IssuerData

NOW = datetime(2027, 3, 1, 12, 0, 0, tzinfo=UTC)
DSO = "Test DSO"


class SoftSigner:
    """A ``DigestSigner`` over software keys: raw r || s, as CKM_ECDSA returns it."""

    def __init__(self, keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
        self.keys = keys

    def sign_digests(self, label: str, digests: Sequence[bytes]) -> list[bytes]:
        key = self.keys[label]
        size = (key.curve.key_size + 7) // 8
        out = []
        for digest in digests:
            algorithm = hashes.SHA256() if size == 32 else hashes.SHA384()
            r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(algorithm))))
            out.append(r.to_bytes(size, "big") + s.to_bytes(size, "big"))
        return out


@pytest.fixture(scope="module")
def chain() -> tuple[SoftSigner, x509.Certificate, x509.Certificate]:
    """A root (P-384) and a device CA (P-256) made through the HSM path with software keys."""
    keys = {"root": ec.generate_private_key(ec.SECP384R1()),
            "dev": ec.generate_private_key(ec.SECP256R1())}
    signer = SoftSigner(keys)
    root_ca, dev_ca = profiles.CAS[profiles.ROOT], profiles.CAS[profiles.DEVICE_P256]
    builder = profiles.ca_builder(DSO, root_ca, 1, keys["root"].public_key(), None,
                                  profiles.new_serial(), NOW)
    (root_der,) = signing.sign_certificates(signer, "root", "P-384",
                                            [signing.certificate_tbs(builder, "P-384")], None)
    root = x509.load_der_x509_certificate(root_der)
    facts = profiles.IssuerFacts.of(root, "http://pki.invalid/crl/root-1.crl")
    builder = profiles.ca_builder(DSO, dev_ca, 1, keys["dev"].public_key(), facts,
                                  profiles.new_serial(), NOW)
    (dev_der,) = signing.sign_certificates(signer, "root", "P-384",
                                           [signing.certificate_tbs(builder, "P-384")], root)
    return signer, root, x509.load_der_x509_certificate(dev_der)


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(kind)


def test_root_and_sub_ca_carry_their_constraints(chain) -> None:  # type: ignore[no-untyped-def]
    _, root, dev = chain
    assert _ext(root, x509.BasicConstraints).value.path_length == 1
    assert _ext(dev, x509.BasicConstraints).value.path_length == 0
    for cert in (root, dev):
        assert _ext(cert, x509.BasicConstraints).critical
        usage = _ext(cert, x509.KeyUsage)
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        assert not usage.value.digital_signature
    assert root.issuer == root.subject
    assert dev.issuer == root.subject
    assert _ext(dev, x509.AuthorityKeyIdentifier).value.key_identifier == \
        _ext(root, x509.SubjectKeyIdentifier).value.digest
    point = _ext(dev, x509.CRLDistributionPoints).value[0].full_name[0].value
    assert point == "http://pki.invalid/crl/root-1.crl"
    assert dev.not_valid_after_utc - dev.not_valid_before_utc == policy.SUB_CA_VALIDITY
    assert isinstance(dev.signature_hash_algorithm, hashes.SHA384)


def test_firmware_signer_is_a_code_signing_leaf() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root_key = ec.generate_private_key(ec.SECP384R1())
    root_builder = profiles.ca_builder(DSO, profiles.CAS[profiles.ROOT], 1,
                                       root_key.public_key(), None, 7, NOW)
    root = root_builder.sign(root_key, hashes.SHA384())
    cert = profiles.ca_builder(DSO, profiles.CAS[profiles.FIRMWARE], 1, key.public_key(),
                               profiles.IssuerFacts.of(root, "http://x/root-1.crl"), 9,
                               NOW).sign(root_key, hashes.SHA384())
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, x509.BasicConstraints)
    usage = _ext(cert, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CODE_SIGNING]


@pytest.mark.parametrize(("usage", "signature", "agreement"), [
    pytest.param(profiles.SIGNATURE, True, False, id="digital-signature"),
    pytest.param(profiles.KEY_AGREEMENT, False, True, id="key-agreement"),
])
def test_device_certificate_follows_the_green_book_profile(  # type: ignore[no-untyped-def]
        chain, usage: str, signature: bool, agreement: bool) -> None:
    signer, _, dev = chain
    meter = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = meter.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    issuer = IssuerData("device-p256", 1, "P-256", "dev",
                        dev.public_bytes(serialization.Encoding.DER),
                        "http://pki.invalid/crl/device-p256-1.crl", DSO)
    (issued,) = issue_device_certificates(signer, issuer, [
        DeviceRequest("4D4B530000000001", spki, usage, "MKS0000000001")], NOW)
    cert = x509.load_der_x509_certificate(issued.der)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "4D4B530000000001"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == DSO
    key_usage = _ext(cert, x509.KeyUsage)
    assert key_usage.critical
    assert (key_usage.value.digital_signature, key_usage.value.key_agreement) == \
        (signature, agreement)
    assert _ext(cert, x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(meter)
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == \
        _ext(dev, x509.SubjectKeyIdentifier).value.digest
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == policy.DEVICE_CERT_VALIDITY
    assert 0 < cert.serial_number < 1 << 159 and cert.serial_number == issued.serial
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(dev)


def test_a_key_on_another_curve_is_refused(chain) -> None:  # type: ignore[no-untyped-def]
    signer, _, dev = chain
    spki = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    issuer = IssuerData("device-p256", 1, "P-256", "dev",
                        dev.public_bytes(serialization.Encoding.DER), "http://x/d.crl", DSO)
    with pytest.raises(PkiError, match="4D4B530000000001.*P-256"):
        issue_device_certificates(signer, issuer, [
            DeviceRequest("4D4B530000000001", spki, profiles.SIGNATURE)], NOW)


def test_a_wrong_signature_never_leaves_the_signer(chain) -> None:  # type: ignore[no-untyped-def]
    signer, root, _ = chain
    builder = profiles.ca_builder(DSO, profiles.CAS[profiles.MAINTENANCE], 1,
                                  signer.keys["dev"].public_key(),
                                  profiles.IssuerFacts.of(root, "http://x/r.crl"), 3, NOW)
    tbs = signing.certificate_tbs(builder, "P-384")
    wrong = SoftSigner({"root": ec.generate_private_key(ec.SECP384R1())})
    with pytest.raises(PkiError, match="does not verify"):
        signing.sign_certificates(wrong, "root", "P-384", [tbs], root)


@pytest.mark.parametrize("title", ["4d4b530000000001", "4D4B53", "4D4B53000000000G", ""])
def test_a_malformed_system_title_is_refused(title: str) -> None:
    with pytest.raises(PkiError, match="16 upper-case hex"):
        profiles.device_name(DSO, title)


def test_crl_lists_reasons_and_numbers(chain) -> None:  # type: ignore[no-untyped-def]
    signer, root, _ = chain
    facts = profiles.IssuerFacts.of(root, None)
    revoked = [profiles.Revoked(5, NOW, x509.ReasonFlags.key_compromise),
               profiles.Revoked(6, NOW, x509.ReasonFlags.unspecified)]
    builder = profiles.crl_builder(facts, 4, NOW, NOW + timedelta(days=7), revoked)
    der = signing.sign_crl(signer, "root", "P-384", signing.crl_tbs(builder, "P-384"), root)
    crl = x509.load_der_x509_crl(der)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4
    entry = crl.get_revoked_certificate_by_serial_number(5)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.key_compromise
    unspecified = crl.get_revoked_certificate_by_serial_number(6)
    assert unspecified is not None and len(unspecified.extensions) == 0
    with pytest.raises(PkiError):
        profiles.crl_builder(facts, 0, NOW, NOW, [])


@pytest.mark.parametrize(("text", "value"), [
    pytest.param("1234", 1234, id="decimal"),
    pytest.param("0x4d2", 1234, id="hex"),
    pytest.param("04:D2", 1234, id="openssl"),
])
def test_serials_parse(text: str, value: int) -> None:
    assert profiles.parse_serial(text) == value


def test_serials_are_audited_in_base64() -> None:
    serial = (1 << 159) - 1
    text = profiles.serial_b64(serial)
    assert len(text) == 27 and not any(c in text for c in "=+/")
    with pytest.raises(PkiError):
        profiles.parse_serial("twelve")


def test_der_lengths_of_long_form() -> None:
    assert signing._length(0x7F) == b"\x7f"
    assert signing._length(0x80) == b"\x81\x80"
    assert signing._length(0x1234) == b"\x82\x12\x34"
    with pytest.raises(PkiError, match="64"):
        signing.assemble(b"\x30\x00", "P-256", b"\x00" * 63)


def test_crl_urls_are_per_key() -> None:
    assert profiles.crl_url("http://pki.invalid/crl", "device-p256", 2) == \
        "http://pki.invalid/crl/device-p256-2.crl"
    with pytest.raises(PkiError, match="unknown"):
        profiles.profile("device-p521")
