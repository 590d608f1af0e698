"""Manufacturer trust: the simulator's factory certificates, good and bad, as a scenario table."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle.errors import FactoryTrustError, PkiError
from lifecycle.pki import trust
from simulator.manufacturer import Manufacturer

# The simulator's factory CAs are valid from a day before they are made (now), for 30 years.
MADE = dt.datetime.now(dt.UTC).replace(microsecond=0)
NOW = MADE + dt.timedelta(days=30)
TITLE = "41434D0000000007"  # what the simulator gives acme's meter 7


@pytest.fixture(scope="module")
def makers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manufacturer]:
    root = Path(tmp_path_factory.mktemp("makers"))
    return {v: Manufacturer.create(root / v, v) for v in ("acme", "borealis")}


def _cas(maker: Manufacturer) -> list[bytes]:
    return [maker._cas[s].cert.public_bytes(serialization.Encoding.DER) for s in (1, 2)]


def _factory_cert(maker: Manufacturer, suite: int, *, curve_suite: int | None = None,
                  made: dt.datetime = MADE) -> bytes:
    """A factory certificate as the simulator's factory CA of ``suite`` issues it; the meter
    key is on the curve of ``curve_suite`` (default: the suite's)."""
    curve = {1: ec.SECP256R1(), 2: ec.SECP384R1()}[curve_suite or suite]
    public = ec.generate_private_key(curve).public_key()
    return maker._cas[suite].issue(public, maker.vendor, "ACM0000000007", TITLE, made)


def test_a_good_factory_certificate_verifies(makers) -> None:  # type: ignore[no-untyped-def]
    for suite in (1, 2):
        cert = trust.verify_factory_certificate("ACM0000000007", TITLE, suite,
                                                _factory_cert(makers["acme"], suite),
                                                _cas(makers["acme"]), NOW)
        assert cert.issuer == makers["acme"]._cas[suite].cert.subject


@pytest.mark.parametrize(("case", "reason"), [
    pytest.param("wrong-curve", "key on P-384; suite 1 needs P-256", id="wrong-curve"),
    pytest.param("expired", "expired at", id="expired"),
    pytest.param("not-yet-valid", "not yet valid", id="not-yet-valid"),
    pytest.param("wrong-subject", "does not name system title 41434D0000000008",
                 id="wrong-subject"),
    pytest.param("other-ca", "not signed by a registered factory CA", id="other-ca"),
    pytest.param("no-cas", "not signed by a registered factory CA", id="no-cas-registered"),
    pytest.param("garbage", "not a DER X.509 certificate", id="not-a-certificate"),
    pytest.param("suite-0", "suite 0 meters carry no factory certificate", id="suite-0"),
])
def test_a_bad_factory_certificate_is_refused_naming_the_meter(  # type: ignore[no-untyped-def]
        makers, case: str, reason: str) -> None:
    acme, borealis = makers["acme"], makers["borealis"]
    der, cas, suite, title, now = _factory_cert(acme, 1), _cas(acme), 1, TITLE, NOW
    if case == "wrong-curve":  # a suite 2 certificate in a suite 1 meter's row
        der = _factory_cert(acme, 2)
    elif case == "expired":
        now = MADE + dt.timedelta(days=round(365.25 * 15) + 2)
    elif case == "not-yet-valid":
        now = MADE - dt.timedelta(hours=1)
    elif case == "wrong-subject":
        title = "41434D0000000008"
    elif case == "other-ca":
        cas = _cas(borealis)
    elif case == "no-cas":
        cas = []
    elif case == "garbage":
        der = b"\x30\x03\x02\x01\x00"
    elif case == "suite-0":
        suite = 0
    with pytest.raises(FactoryTrustError, match=reason) as raised:
        trust.verify_factory_certificate("ACM0000000007", title, suite, der, cas, now)
    assert raised.value.meter == "ACM0000000007"
    assert "ACM0000000007" in str(raised.value)


def test_a_factory_ca_must_be_a_ca(makers) -> None:  # type: ignore[no-untyped-def]
    acme = makers["acme"]
    assert trust.check_factory_ca(_cas(acme)[0], NOW).subject == acme._cas[1].cert.subject
    with pytest.raises(PkiError, match="not a CA"):
        trust.check_factory_ca(_factory_cert(acme, 1), NOW)
    with pytest.raises(PkiError, match="not valid at"):
        trust.check_factory_ca(_cas(acme)[0], NOW + dt.timedelta(days=365 * 40))


def test_errors_pickle(makers) -> None:  # type: ignore[no-untyped-def]
    import pickle

    error = FactoryTrustError("ACM0000000007", "expired")
    again = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object
    assert isinstance(again, FactoryTrustError) and again.meter == "ACM0000000007"
    assert str(again) == str(error)


def test_the_factory_check_job_runs_on_anchors_sent_by_pickle_after_use(makers) -> None:  # type: ignore[no-untyped-def]
    """Anchors already used in this process (their CAs parsed, which do not pickle) still go
    to an HSM worker; there the job accepts the good meter and names why the others fail."""
    import base64
    import pickle

    anchors = trust.Anchors(tuple(_cas(makers["acme"])))
    assert anchors.parsed  # parsed here first, as a caller verifying meters would
    good = base64.b64encode(_factory_cert(makers["acme"], 1)).decode()
    other = base64.b64encode(_factory_cert(makers["borealis"], 1)).decode()
    meters = (trust.FactoryCheck("ACM0000000007", TITLE, 1, 7, good),
              trust.FactoryCheck("ACM0000000007", TITLE, 1, 7, other),
              trust.FactoryCheck("ACM0000000007", TITLE, 1, 7, "not base64!"),
              trust.FactoryCheck("ACM0000000007", TITLE, 1, 8, good))
    sent = pickle.dumps(trust.FactoryCheckJob(meters, {7: anchors}, NOW))
    job = pickle.loads(sent)  # noqa: S301 - our own object
    reasons = trust.check_factory_job(None, job)  # type: ignore[arg-type]
    assert reasons[0] is None
    assert reasons[1] is not None and "not signed by a registered factory CA" in reasons[1]
    assert reasons[2] == "factory certificate refused: not base64"
    assert reasons[3] is not None and "no registered factory CA" in reasons[3]
