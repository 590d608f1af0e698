"""Certificate requests and certificate orders through the HES port: FileHes files (strict) and
the simulated meters (requests that check, certificates imported only for their own keys)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lifecycle.claim.certificate_request import check_request
from lifecycle.errors import ClaimError, PortError
from lifecycle.hes.files import CERTIFICATES, CSR_ANSWERS, CSR_ASKS, FileHes
from lifecycle.hes.port import CertificateOrder, MeterRef, csr_line, decode_csrs
from lifecycle.pki import profiles
from lifecycle.policy import KeyId
from simulator.meter import SimulatedMeter

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def meter(suite: int, title: str = "4D4B530000000001") -> SimulatedMeter:
    return SimulatedMeter("M1", bytes.fromhex(title), suite,
                          {k: bytes(16 if suite == 1 else 32) for k in KeyId})


def test_file_hes_asks_and_reads_certificate_requests(tmp_path: Path) -> None:
    hes = FileHes(tmp_path / "orders.jsonl", tmp_path / "outcomes.jsonl")
    refs = [MeterRef("M1", "4D4B530000000001", 1), MeterRef("M2", "4D4B530000000002", 2)]
    assert hes.certificate_requests(refs) == {}
    assert (tmp_path / CSR_ASKS).read_text().count("\n") == 2
    (tmp_path / CSR_ANSWERS).write_text(csr_line("M1", b"\x30\x01", b"\x30\x02") + "\n"
                                        + csr_line("M9", b"\x30", b"\x30") + "\n")
    assert hes.certificate_requests(refs) == {"M1": (b"\x30\x01", b"\x30\x02")}
    order = CertificateOrder("CC-1", "M1", "4D4B530000000001", b"\x30\x03", b"\x30\x04", NOW)
    hes.import_certificates([order])
    hes.import_certificates([order])
    assert (tmp_path / CERTIFICATES).read_text().count('"CC-1"') == 2


@pytest.mark.parametrize(("line", "reason"), [
    pytest.param("{", "line 1: not JSON", id="not-json"),
    pytest.param('{"meter_serial": "M1", "signature_csr": "30"}', "missing field",
                 id="missing"),
    pytest.param('{"meter_serial": "M1", "signature_csr": "30", "key_agreement_csr": "30", '
                 '"x": 1}', "unknown field x", id="unknown"),
    pytest.param('{"meter_serial": "M1", "signature_csr": "zz", "key_agreement_csr": "30"}',
                 "signature_csr is not hex", id="bad-hex"),
    pytest.param('{"meter_serial": "M1", "signature_csr": 30, "key_agreement_csr": "30"}',
                 "wrong type", id="wrong-type"),
    pytest.param('{"meter_serial": "M1", "signature_csr": "", "key_agreement_csr": "30"}',
                 "empty", id="empty"),
    pytest.param('{"meter_serial": "M1", "signature_csr": "30", "key_agreement_csr": "30"}\n'
                 '{"meter_serial": "M1", "signature_csr": "30", "key_agreement_csr": "30"}',
                 "line 2: meter 'M1' appears twice", id="twice"),
])
def test_bad_certificate_request_lines_are_refused_naming_file_and_line(
        line: str, reason: str) -> None:
    with pytest.raises(PortError, match="csrs.jsonl") as info:
        decode_csrs(line, "csrs.jsonl")
    assert reason in str(info.value)


@pytest.mark.parametrize("suite", [1, 2])
def test_a_simulated_meter_makes_requests_that_check_and_keeps_its_keys(suite: int) -> None:
    m = meter(suite)
    title = m.system_title.hex().upper()
    for usage, name in (("signature", profiles.SIGNATURE),
                        ("key_agreement", profiles.KEY_AGREEMENT)):
        first = check_request("M1", title, suite, name, m.certificate_request(usage))
        assert check_request("M1", title, suite, name, m.certificate_request(usage)) == first
    again = SimulatedMeter.from_state(m.to_state())
    assert again.certificate_request("signature") != b""
    assert again.ec_keys == m.ec_keys


@pytest.mark.parametrize(("flaw", "reason"), [("wrong_subject", "is not CN="),
                                              ("wrong_curve", "suite 1 needs P-256")])
def test_a_flawed_simulated_request_is_refused(flaw: str, reason: str) -> None:
    m = meter(1)
    m.csr_flaw = flaw
    with pytest.raises(ClaimError, match=reason):
        check_request("M1", m.system_title.hex().upper(), 1, profiles.SIGNATURE,
                      m.certificate_request("signature"))


def test_a_simulated_meter_imports_a_certificate_only_for_its_own_key() -> None:
    m = meter(1)
    csr = x509.load_der_x509_csr(m.certificate_request("key_agreement"))
    ca = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")])

    def cert(public: ec.EllipticCurvePublicKey) -> bytes:
        from cryptography.hazmat.primitives import serialization
        built = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(name)
                 .public_key(public).serial_number(1).not_valid_before(NOW)
                 .not_valid_after(NOW.replace(year=2030)).sign(ca, hashes.SHA256()))
        return built.public_bytes(serialization.Encoding.DER)

    own = csr.public_key()
    assert isinstance(own, ec.EllipticCurvePublicKey)
    assert m.import_certificate(cert(own)) == "key_agreement"
    with pytest.raises(ValueError, match="none of its keys"):
        m.import_certificate(cert(ca.public_key()))
    assert list(m.certificates) == ["key_agreement"]
    assert SimulatedMeter.from_state(m.to_state()).certificates == m.certificates
