"""A key transfer end to end against the real SoftHSM2 token: new keys made in the HSM, installed
by a simulated meter (gurux path) from key_data, proven under the new GUEK and checked in the
HSM; the refusals; what a PIN holder finds on the token afterwards; every simulated mode."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px

from lifecycle.config import Settings
from lifecycle.dlms import apdu, key_transfer
from lifecycle.dlms.key_transfer import TRANSFER_ORDER
from lifecycle.dlms.proof import new_challenge
from lifecycle.errors import ProofRefused
from lifecycle.hes.port import KeyOrder
from lifecycle.hsm import dlms_ops
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.templates import call_template, master_profile, usage_profile
from lifecycle.meter_keys import transfer
from lifecycle.meter_keys.binding import BlobContext, message
from lifecycle.meter_keys.transfer import (
    MeterTransfer,
    ProofCheck,
    ProofJob,
    Refused,
    Transfer,
    TransferJob,
)
from lifecycle.policy import KeyId, storage_kek_role
from simulator.hes import SimulatedHes
from simulator.meter import SimulatedMeter
from tests.attackers import allowed_mechanisms_mapper, pin_holder_session

NOW = datetime(2026, 11, 29, tzinfo=UTC)


@dataclass
class Factory:
    """A meter as the import leaves it: plaintext keys (the meter's), bound blobs (meterkeys')."""

    meter: SimulatedMeter
    blobs: dict[KeyId, tuple[bytes, bytes]]  # key id -> (blob, MAC), version 1

    @property
    def title(self) -> str:
        return self.meter.system_title.hex().upper()

    def transfer_request(self) -> MeterTransfer:
        blob, mac = self.blobs[KeyId.KEK]
        return MeterTransfer(self.meter.serial, self.title, self.meter.suite, blob, mac, 1, 2)


@pytest.fixture(scope="module")
def import_label(hsm: Hsm) -> str:
    label = f"dlms-import-{uuid.uuid4().hex[:8]}"
    with hsm.session() as s:
        s.generate_token_rsa(label, 2048)
    return label


def _factory(hsm: Hsm, settings: Settings, import_label: str, suite: int, n: int) -> Factory:
    """Import one meter's keys as the factory import does: RSA-OAEP transport key, re-wrap."""
    size = 32 if suite == 2 else 16
    keys = {k: secrets.token_bytes(size) for k in KeyId}
    serial, title = f"DLM{n:010d}", f"444C4D{n:010X}"
    transport = secrets.token_bytes(32)
    targets = [settings.kek_label(storage_kek_role(k)) for k in KeyId]
    with hsm.session() as s:
        public = serialization.load_pem_public_key(s.public_key_pem(import_label))
        assert isinstance(public, rsa.RSAPublicKey)
        wrapped = public.encrypt(transport, padding.OAEP(
            mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))  # noqa: S303
        with s.scoped(s.unwrap_rsa_oaep(import_label, wrapped, oaep_hash="sha1")) as t:
            blobs = s.rewrap(t, [aes_key_wrap(transport, keys[k]) for k in KeyId], targets)
        macs = s.mac(settings.blob_mac_label, [
            message(BlobContext(serial, title, k, 1, label), blob or b"")
            for k, label, blob in zip(KeyId, targets, blobs, strict=True)])
    meter = SimulatedMeter.from_secrets({"serial": serial, "system_title": title, "suite": suite,
                                         **{k.field: keys[k].hex() for k in KeyId}})
    return Factory(meter, {k: (b or b"", m) for k, b, m in zip(KeyId, blobs, macs, strict=True)})


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def factory(hsm: Hsm, settings: Settings, import_label: str) -> Iterator[Any]:
    yield lambda suite=0: _factory(hsm, settings, import_label, suite, next(_counter))


def _transfer(settings: Settings, meter: Factory) -> Transfer:
    (made,) = transfer.run_transfer(settings, TransferJob([meter.transfer_request()]))
    assert isinstance(made, Transfer)
    return made


def _check(meter: Factory, guek: tuple[bytes, bytes], version: int, challenge: bytes,
           answer: bytes, last: int | None = None) -> ProofCheck:
    return ProofCheck(meter.meter.serial, meter.title, meter.meter.suite, guek[0], guek[1],
                      version, challenge, answer, last)


def _new_guek(made: Transfer) -> tuple[bytes, bytes]:
    key = next(k for k in made.keys if k.key_id == KeyId.GUEK)
    return key.blob, key.mac


@pytest.mark.parametrize("suite", [0, 1, 2])
def test_a_meter_installs_new_keys_and_the_hsm_accepts_its_proof(
        settings: Settings, factory: Any, suite: int) -> None:
    meter = factory(suite)
    made = _transfer(settings, meter)
    assert [k.key_id for k in made.keys] == list(TRANSFER_ORDER)
    assert [e.key_id for e in key_transfer.decode(made.key_data)] == list(TRANSFER_ORDER)
    assert {k.version for k in made.keys} == {2}
    old = dict(meter.meter.keys)
    challenge = new_challenge()
    answer = meter.meter.handle_order(meter.meter.system_title, made.key_data, challenge)
    assert answer is not None and answer.status == "ok" and answer.proof is not None
    assert all(meter.meter.keys[k] != old[k] for k in KeyId)  # gurux path installed all four
    counter = transfer.check_proof(settings, _check(meter, _new_guek(made), 2, challenge,
                                                    answer.proof))
    assert counter == apdu.parse(answer.proof).invocation_counter
    # Under the old GUEK the same answer proves nothing.
    with pytest.raises(ProofRefused, match="not the challenge under GUEK version 1"):
        transfer.check_proof(settings, _check(meter, meter.blobs[KeyId.GUEK], 1, challenge,
                                              answer.proof))


def test_the_new_blobs_are_bound_and_open_with_their_profiles(
        hsm: Hsm, settings: Settings, factory: Any) -> None:
    meter = factory()
    made = _transfer(settings, meter)
    with hsm.session() as s:
        assert s.verify_mac(settings.blob_mac_label, [
            message(BlobContext(meter.meter.serial, meter.title, k.key_id, 2, k.kek_label),
                    k.blob) for k in made.keys], [k.mac for k in made.keys]) == [True] * 4
    # The new master key wraps the next transfer: a second transfer from version 2.
    master = next(k for k in made.keys if k.key_id == KeyId.KEK)
    meter.meter.handle_order(meter.meter.system_title, made.key_data, new_challenge())
    second = replace(meter.transfer_request(), master_blob=master.blob, master_mac=master.mac,
                     master_version=2, new_version=3)
    (again,) = transfer.run_transfer(settings, TransferJob([second]))
    assert isinstance(again, Transfer)
    assert meter.meter.apply_key_transfer(again.key_data) == list(TRANSFER_ORDER)


@pytest.mark.parametrize("case", ["wrong-challenge", "replayed", "other-meter", "unbound-guek",
                                  "tampered"])
def test_proofs_that_do_not_hold_are_refused(settings: Settings, factory: Any,
                                             case: str) -> None:
    meter = factory()
    made = _transfer(settings, meter)
    challenge = new_challenge()
    answer = meter.meter.handle_order(meter.meter.system_title, made.key_data, challenge)
    assert answer is not None and answer.proof is not None
    proof, guek, last = answer.proof, _new_guek(made), None
    ic = apdu.parse(proof).invocation_counter
    if case == "wrong-challenge":
        challenge = new_challenge()
    elif case == "replayed":
        last = ic
    elif case == "other-meter":
        meter = replace(meter, meter=factory().meter)
    elif case == "unbound-guek":
        guek = (guek[0], bytes(16))
    else:
        proof = proof[:-20] + bytes([proof[-20] ^ 1]) + proof[-19:]
    verdict = transfer.run_proof_checks(settings, ProofJob(
        [_check(meter, guek, 2, challenge, proof, last)]))[0]
    assert not verdict.proven, case


def test_a_master_blob_not_bound_to_the_meter_gets_no_keys(settings: Settings,
                                                           factory: Any) -> None:
    a, b = factory(), factory()
    planted = replace(a.transfer_request(), master_blob=b.blobs[KeyId.KEK][0],
                      master_mac=b.blobs[KeyId.KEK][1])
    made = transfer.run_transfer(settings, TransferJob([planted, b.transfer_request()]))
    assert isinstance(made[0], Refused) and "not bound" in made[0].reason
    assert isinstance(made[1], Transfer)


def _objects(session: Any) -> set[int]:
    return {o.handle for o in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})}


def test_a_pin_holder_finds_no_new_key_and_cannot_read_the_new_blobs(
        settings: Settings, factory: Any) -> None:
    meter = factory()
    mapper = allowed_mechanisms_mapper()
    with pin_holder_session(settings, rw=True, attribute_mapper=mapper) as attacker:
        before = _objects(attacker)
        made = _transfer(settings, meter)
        assert _objects(attacker) == before  # no new key left, token or session object
        for key in made.keys:
            kek = attacker.get_key(object_class=ObjectClass.SECRET_KEY, label=key.kek_label)
            with pytest.raises(px.TemplateInconsistent):
                kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, key.blob,
                               mechanism=Mechanism.AES_KEY_WRAP,
                               template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                                         Attribute.EXTRACTABLE: True})
            profile = master_profile() if key.key_id == KeyId.KEK else usage_profile()
            opened = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, key.blob,
                                    mechanism=Mechanism.AES_KEY_WRAP,
                                    template=call_template(profile))
            try:
                assert opened[Attribute.EXTRACTABLE] is False
                assert opened[Attribute.SENSITIVE] is True
                wanted = Mechanism.AES_KEY_WRAP if key.key_id == KeyId.KEK else Mechanism.AES_GCM
                assert list(opened[Attribute.ALLOWED_MECHANISMS]) == [wanted]
                assert bool(opened[Attribute.WRAP]) == (key.key_id == KeyId.KEK)
                assert bool(opened[Attribute.ENCRYPT]) == (key.key_id != KeyId.KEK)
                with pytest.raises(px.PKCS11Error):
                    opened[Attribute.VALUE]  # noqa: B018 - the read is the attack
            finally:
                opened.destroy()


@pytest.mark.parametrize(("mode", "status", "proven_under"), [
    pytest.param("ok", "ok", 2, id="ok"),
    pytest.param("fail", "failed", 1, id="fail"),
    pytest.param("silent", "timeout", 1, id="silent"),
    pytest.param("lie_nak", "not_ok", 2, id="lie_nak"),
    pytest.param("lie_ok", "ok", 1, id="lie_ok"),
    pytest.param("partial:2", "failed", 1, id="partial-2"),
    pytest.param("partial:3", "failed", 2, id="partial-3"),
])
def test_every_mode_through_the_simulated_hes(settings: Settings, factory: Any, tmp_path: Path,
                                              mode: str, status: str, proven_under: int) -> None:
    meter = factory()
    hes = SimulatedHes(tmp_path / "hes.json", {meter.meter.serial: meter.meter})
    hes.set_mode(meter.meter.serial, mode)
    made = _transfer(settings, meter)
    challenge = new_challenge()
    hes.submit([KeyOrder("o-1", meter.meter.serial, meter.title, 0, made.key_data, challenge,
                         NOW)])
    (outcome,) = hes.outcomes()
    assert outcome.status == status
    guek_of = {1: (meter.blobs[KeyId.GUEK], 1), 2: (_new_guek(made), 2)}
    if outcome.proof_apdu is not None:  # the HES's word is checked, never taken
        proven = [v for v, (guek, _) in guek_of.items() if transfer.run_proof_checks(
            settings, ProofJob([_check(meter, guek, v, challenge, outcome.proof_apdu)]))[0].proven]
        assert proven == [1 if mode == "lie_ok" else 2]
    # Recovery asks the meter to prove what it holds: exactly one version works.
    recovery = new_challenge()
    proof = hes.prove(meter.meter.serial, meter.title, recovery)
    assert proof is not None
    proven = [v for v, (guek, version) in guek_of.items() if transfer.run_proof_checks(
        settings, ProofJob([_check(meter, guek, version, recovery, proof)]))[0].proven]
    assert proven == [proven_under]


def test_rates(hsm: Hsm, settings: Settings, factory: Any) -> None:
    """Measure new_dlms_keys (per meter, 4 keys) and the proof check; print for the notes."""
    meter = factory()
    master = meter.blobs[KeyId.KEK][0]
    labels = [settings.kek_label(storage_kek_role(k)) for k in TRANSFER_ORDER]
    with hsm.session() as s:
        started, n = time.perf_counter(), 200
        for _ in range(n):
            dlms_ops.new_dlms_keys(s, settings.master_kek_label, master, labels,
                                   [int(k) for k in TRANSFER_ORDER], 128)
        keys_rate = n / (time.perf_counter() - started)
        checks = [dlms_ops.CiphertextCheck(meter.blobs[KeyId.GUEK][0], bytes(12), bytes(16),
                                           bytes(16))] * 1000
        started = time.perf_counter()
        assert not any(dlms_ops.gcm_ciphertexts_match(s, settings.storage_kek_label, checks))
        proof_rate = len(checks) / (time.perf_counter() - started)
    started = time.perf_counter()
    made = transfer.run_transfer(settings, TransferJob([meter.transfer_request()] * n))
    job_rate = n / (time.perf_counter() - started)
    guek = _new_guek(made[0])  # type: ignore[arg-type]
    proofs = [_check(meter, guek, 2, bytes(16), meter.meter.prove(bytes(16)))] * 1000
    started = time.perf_counter()
    assert not any(v.proven for v in transfer.run_proof_checks(settings, ProofJob(proofs)))
    check_rate = len(proofs) / (time.perf_counter() - started)
    print(f"\nnew_dlms_keys: {keys_rate:.0f} meters/s; proof check: {proof_rate:.0f}/s; "
          f"run_transfer (with MACs): {job_rate:.0f} meters/s; run_proof_checks (with "
          f"parse and MAC): {check_rate:.0f}/s")
    assert keys_rate > 50 and proof_rate > 200 and job_rate > 50 and check_rate > 200


@pytest.mark.parametrize(("mode", "proven"), [("ok", True), ("partial:1", False),
                                              ("partial:3", True)])
def test_a_guek_wrapped_under_the_new_master_needs_the_master_order_first(
        settings: Settings, factory: Any, mode: str, proven: bool) -> None:
    # The claim's two orders (lifecycle.claim.rules): GBEK, GAK, master under the current
    # master; then the GUEK alone under the *new* master. Both come from run_transfer.
    meter = factory()
    first = replace(meter.transfer_request(), key_ids=(KeyId.GBEK, KeyId.GAK, KeyId.KEK))
    (made,) = transfer.run_transfer(settings, TransferJob([first]))
    assert isinstance(made, Transfer)
    master = next(k for k in made.keys if k.key_id == KeyId.KEK)
    second = replace(first, key_ids=(KeyId.GUEK,), master_blob=master.blob,
                     master_mac=master.mac, master_version=2)
    (guek,) = transfer.run_transfer(settings, TransferJob([second]))
    assert isinstance(guek, Transfer)
    meter.meter.mode = mode
    meter.meter.handle_order(meter.meter.system_title, made.key_data, new_challenge())
    meter.meter.mode = "ok"
    challenge = new_challenge()
    answer = meter.meter.handle_order(meter.meter.system_title, guek.key_data, challenge)
    assert answer is not None and (answer.status == "ok") == proven
    if proven:
        assert answer.proof is not None
        transfer.check_proof(settings, _check(meter, _new_guek(guek), 2, challenge,
                                              answer.proof))
