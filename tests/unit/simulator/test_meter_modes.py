"""The simulated meter's key orders, proofs, modes and CSRs, and the simulated HES over them.

The meterkeys side is played in software here (new keys wrapped with ``cryptography``, the
proof's ciphertext compared as the HSM compares it); tests/integration/dlms does it with the HSM.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.x509.oid import NameOID

from lifecycle.dlms import apdu, key_transfer
from lifecycle.dlms.key_transfer import TRANSFER_ORDER, KeyEntry
from lifecycle.dlms.proof import new_challenge, parse_answer
from lifecycle.hes.port import KeyOrder
from lifecycle.policy import KeyId
from simulator.hes import STATE_FILE, SimulatedHes
from simulator.meter import Answer, SimulatedMeter, check_mode

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def _meter(suite: int = 0, mode: str = "ok", serial: str = "ACM0000000001",
           title: str = "41434D0000000001") -> SimulatedMeter:
    size = 32 if suite == 2 else 16
    return SimulatedMeter.from_secrets({
        "serial": serial, "system_title": title, "suite": suite,
        "guek": "AA" * size, "gbek": "BB" * size, "gak": "CC" * size, "kek": "DD" * size}, mode)


def _new_keys(meter: SimulatedMeter) -> tuple[dict[KeyId, bytes], bytes]:
    size = len(meter.keys[KeyId.KEK])
    new = {k: os.urandom(size) for k in KeyId}
    data = key_transfer.encode([KeyEntry(k, aes_key_wrap(meter.keys[KeyId.KEK], new[k]))
                                for k in TRANSFER_ORDER])
    return new, data


def _proves(answer: bytes, meter: SimulatedMeter, guek: bytes, challenge: bytes,
            last: int | None = None) -> bool:
    """The HSM's check, in software: the ciphertext part only, any AAD."""
    parsed = parse_answer(answer, meter.system_title, meter.suite, challenge, last)
    return AESGCM(guek).encrypt(parsed.iv, challenge, b"")[:len(challenge)] == parsed.ciphertext


@pytest.mark.parametrize("suite", [0, 1, 2])
def test_gurux_and_cryptography_build_the_same_proof(suite: int) -> None:
    a, b = _meter(suite), _meter(suite)
    b.engine = "cryptography"
    challenge = new_challenge()
    for _ in range(3):
        assert a.prove(challenge) == b.prove(challenge)
    answer = apdu.parse(a.prove(challenge))
    tag = AESGCM(a.keys[KeyId.GUEK]).encrypt(
        answer.iv, challenge, bytes([0x30 | suite]) + a.keys[KeyId.GAK])[16:28]
    assert answer.tag == tag and answer.invocation_counter == 4


def test_gurux_reads_the_proof_back() -> None:
    from gurux_dlms.AesGcmParameter import AesGcmParameter
    from gurux_dlms.GXByteBuffer import GXByteBuffer
    from gurux_dlms.GXDLMSChippering import GXDLMSChippering
    from gurux_dlms.GXDLMSSettings import GXDLMSSettings

    meter, challenge = _meter(), new_challenge()
    meter.engine = "cryptography"
    p = AesGcmParameter(0, None, meter.keys[KeyId.GUEK], meter.keys[KeyId.GAK])
    plain = GXDLMSChippering.decryptAesGcm(GXDLMSSettings(False, None), p,
                                           GXByteBuffer(meter.prove(challenge)))
    assert bytes(plain) == challenge


@pytest.mark.parametrize(("mode", "status", "installed", "proof_under"), [
    pytest.param("ok", "ok", 4, "new", id="ok"),
    pytest.param("fail", "failed", 0, None, id="fail"),
    pytest.param("silent", None, 0, None, id="silent"),
    pytest.param("lie_nak", "not_ok", 4, None, id="lie_nak"),
    pytest.param("lie_ok", "ok", 0, "old", id="lie_ok"),
    pytest.param("partial:0", "failed", 0, None, id="partial-0"),
    pytest.param("partial:2", "failed", 2, None, id="partial-2"),
    pytest.param("partial:3", "failed", 3, None, id="partial-3"),
])
def test_each_mode_does_what_it_says(mode: str, status: str | None, installed: int,
                                     proof_under: str | None) -> None:
    meter = _meter(mode=mode)
    old = dict(meter.keys)
    new, data = _new_keys(meter)
    challenge = new_challenge()
    answer = meter.handle_order(meter.system_title, data, challenge)
    assert (answer.status if answer else None) == status
    changed = [k for k in TRANSFER_ORDER if meter.keys[k] == new[k]]
    assert changed == list(TRANSFER_ORDER[:installed])  # a prefix, in transfer order
    assert all(meter.keys[k] == old[k] for k in TRANSFER_ORDER[installed:])
    if proof_under is None:
        assert answer is None or answer.proof is None
    else:
        assert answer is not None and answer.proof is not None
        guek = new[KeyId.GUEK] if proof_under == "new" else old[KeyId.GUEK]
        assert _proves(answer.proof, meter, guek, challenge)
        other = old[KeyId.GUEK] if proof_under == "new" else new[KeyId.GUEK]
        assert not _proves(answer.proof, meter, other, challenge)


def test_a_prefix_with_the_new_guek_has_every_usage_key_new() -> None:
    # TRANSFER_ORDER puts GUEK after GBEK and GAK: a proof under the new GUEK means all three.
    for k in range(5):
        meter = _meter(mode=f"partial:{k}")
        new, data = _new_keys(meter)
        meter.handle_order(meter.system_title, data, new_challenge())
        if meter.keys[KeyId.GUEK] == new[KeyId.GUEK]:
            assert all(meter.keys[i] == new[i] for i in (KeyId.GBEK, KeyId.GAK))


def test_an_order_for_another_system_title_fails() -> None:
    meter = _meter()
    old = dict(meter.keys)
    _, data = _new_keys(meter)
    assert meter.handle_order(bytes(8), data, new_challenge()) == Answer("failed")
    assert meter.keys == old


def test_counters_rise_and_restart_with_a_new_guek() -> None:
    meter, challenge = _meter(), new_challenge()
    first, second = (apdu.parse(meter.prove(challenge)).invocation_counter for _ in range(2))
    assert second > first
    _, data = _new_keys(meter)
    answer = meter.handle_order(meter.system_title, data, challenge)
    assert answer is not None and answer.proof is not None
    assert apdu.parse(answer.proof).invocation_counter == 1


def test_unknown_modes_are_refused() -> None:
    for mode in ("maybe", "partial:", "partial:x"):
        with pytest.raises(ValueError, match="unknown meter mode"):
            check_mode(mode)


@pytest.mark.parametrize(("suite", "curve"), [(1, "secp256r1"), (2, "secp384r1")])
def test_suite_1_and_2_meters_make_csrs(suite: int, curve: str) -> None:
    meter = _meter(suite)
    csrs = {usage: x509.load_pem_x509_csr(meter.csr(usage))
            for usage in ("signature", "key_agreement")}
    for usage, csr in csrs.items():
        assert csr.is_signature_valid
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == curve
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == "41434D0000000001"
        key_usage = csr.extensions.get_extension_for_class(x509.KeyUsage).value
        assert key_usage.digital_signature == (usage == "signature")
        assert key_usage.key_agreement == (usage == "key_agreement")
    assert csrs["signature"].public_key() != csrs["key_agreement"].public_key()
    again = x509.load_pem_x509_csr(meter.csr("signature")).public_key()
    assert again == csrs["signature"].public_key()  # the meter keeps its key pair
    with pytest.raises(ValueError, match="suite 0"):
        _meter(0).csr("signature")


# --- the simulated HES --------------------------------------------------------------------------
def _secrets(path: Path, meters: list[SimulatedMeter]) -> Path:
    path.write_text("".join(json.dumps({
        "serial": m.serial, "system_title": m.system_title.hex().upper(), "suite": m.suite,
        **{k.field: v.hex().upper() for k, v in m.keys.items()}}) + "\n" for m in meters))
    return path


def _order(meter: SimulatedMeter, data: bytes, challenge: bytes, n: int = 1) -> KeyOrder:
    return KeyOrder(f"o-{meter.serial}-{n}", meter.serial, meter.system_title.hex().upper(),
                    meter.suite, data, challenge, NOW)


def test_the_simulated_hes_survives_a_restart(tmp_path: Path) -> None:
    meters = [_meter(serial=f"ACM000000000{i}", title=f"41434D000000000{i}") for i in range(3)]
    secrets = _secrets(tmp_path / "batch.meter-secrets.jsonl", meters)
    home = tmp_path / "sim"
    hes = SimulatedHes.open(home, [secrets], modes={"ACM0000000001": "silent"},
                            clock=lambda: NOW)
    assert stat.S_IMODE((home / STATE_FILE).stat().st_mode) == 0o600
    new, data = _new_keys(meters[0])  # every test meter starts with the same master key
    challenge = new_challenge()
    hes.submit([_order(m, data, challenge) for m in meters]
               + [_order(_meter(serial="NOPE"), data, challenge)])
    assert hes.meter_seconds > 0
    # Killed here and started again: the meters hold what the completed call left them.
    again = SimulatedHes.open(home, [secrets], clock=lambda: NOW)
    assert again.meters["ACM0000000000"].keys == new
    assert again.meters["ACM0000000001"].keys == meters[1].keys
    assert again.meters["ACM0000000001"].mode == "silent"
    statuses = {o.meter_serial: o.status for o in again.outcomes()}
    assert statuses == {"ACM0000000000": "ok", "ACM0000000001": "timeout",
                        "ACM0000000002": "ok", "NOPE": "failed"}
    assert again.outcomes() == [] and SimulatedHes.load(home).outcomes() == []


def test_the_simulated_hes_proves_for_recovery(tmp_path: Path) -> None:
    meter = _meter()
    hes = SimulatedHes.open(tmp_path, [_secrets(tmp_path / "s.jsonl", [meter])],
                            modes={meter.serial: "lie_nak"}, engine="cryptography")
    new, data = _new_keys(meter)
    challenge = new_challenge()
    hes.submit([_order(meter, data, challenge)])
    assert [o.status for o in hes.outcomes()] == ["not_ok"]
    title = meter.system_title.hex().upper()
    proof = hes.prove(meter.serial, title, challenge)
    assert proof is not None and _proves(proof, meter, new[KeyId.GUEK], challenge)
    again = SimulatedHes.load(tmp_path).prove(meter.serial, title, challenge)
    assert again is not None
    assert apdu.parse(again).invocation_counter > apdu.parse(proof).invocation_counter
    assert hes.prove("NOPE", title, challenge) is None
    assert hes.prove(meter.serial, "00" * 8, challenge) is None


# --- the simulated HES's state: a snapshot and a journal of what each call changed -------------
def _fleet(tmp_path: Path, n: int = 3) -> tuple[SimulatedHes, list[SimulatedMeter], Path]:
    meters = [_meter(serial=f"ACM000000000{i}", title=f"41434D000000000{i}") for i in range(n)]
    home = tmp_path / "sim"
    hes = SimulatedHes.open(home, [_secrets(tmp_path / "batch.meter-secrets.jsonl", meters)],
                            engine="cryptography", clock=lambda: NOW)
    return hes, meters, home


def _journal_lines(hes: SimulatedHes) -> list[dict[str, object]]:
    return [json.loads(line) for line in hes.journal_path.read_text(encoding="utf-8").splitlines()]


def test_a_call_appends_only_the_meters_it_changed(tmp_path: Path) -> None:
    hes, meters, home = _fleet(tmp_path)
    snapshot = (home / STATE_FILE).read_bytes()
    new, data = _new_keys(meters[0])
    hes.submit([_order(meters[0], data, new_challenge())])
    assert (home / STATE_FILE).read_bytes() == snapshot  # the other meters are not rewritten
    journal = hes.journal_path
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600  # it holds keys in clear, as the file
    [line] = _journal_lines(hes)
    assert [m["serial"] for m in line["meters"]] == ["ACM0000000000"]  # type: ignore[index]
    assert len(line["outcomes"]) == 1  # type: ignore[arg-type]
    again = SimulatedHes.load(home)
    assert again.meters["ACM0000000000"].keys == new
    assert again.meters["ACM0000000001"].keys == meters[1].keys
    assert [o.meter_serial for o in again.outcomes()] == ["ACM0000000000"]


def test_a_call_cut_short_in_the_journal_never_happened(tmp_path: Path) -> None:
    hes, meters, home = _fleet(tmp_path)
    title = meters[1].system_title.hex().upper()
    hes.prove(meters[1].serial, title, new_challenge())
    hes.prove(meters[1].serial, title, new_challenge())
    counter = hes.meters[meters[1].serial].invocation_counter
    journal = hes.journal_path
    whole = journal.read_bytes()
    # Killed while appending the third call's line: part of it reached the disk.
    with journal.open("ab") as fh:
        fh.write(whole.splitlines(keepends=True)[-1][:40])
    again = SimulatedHes.load(home)
    assert again.meters[meters[1].serial].invocation_counter == counter
    assert journal.read_bytes() == whole  # the part cut off, so the next line starts clean
    again.prove(meters[1].serial, title, new_challenge())
    assert SimulatedHes.load(home).meters[meters[1].serial].invocation_counter == counter + 1


def test_a_journal_left_from_an_older_snapshot_is_not_replayed(tmp_path: Path) -> None:
    hes, meters, home = _fleet(tmp_path)
    title = meters[2].system_title.hex().upper()
    hes.prove(meters[2].serial, title, new_challenge())
    journal = hes.journal_path
    first = journal.read_bytes()
    hes.prove(meters[2].serial, title, new_challenge())
    hes.save()  # a new snapshot; killed before the old journal was removed:
    journal.write_bytes(first)
    again = SimulatedHes.load(home)
    assert again.meters[meters[2].serial].invocation_counter == 2  # not set back to 1
    assert not journal.exists()


def test_a_journal_that_outgrows_its_snapshot_becomes_a_new_one(tmp_path: Path) -> None:
    hes, meters, home = _fleet(tmp_path, n=2)
    generation = json.loads((home / STATE_FILE).read_text(encoding="utf-8"))["generation"]
    title = meters[0].system_title.hex().upper()
    journal = hes.journal_path
    calls = 0
    while calls == 0 or journal.exists():
        hes.prove(meters[0].serial, title, new_challenge())
        calls += 1
        assert calls < 10
    assert calls > 1  # the journal took the first calls
    doc = json.loads((home / STATE_FILE).read_text(encoding="utf-8"))
    assert doc["generation"] == generation + 1
    assert SimulatedHes.load(home).meters[meters[0].serial].invocation_counter == calls
