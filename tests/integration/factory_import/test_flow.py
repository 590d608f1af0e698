"""The factory-import flow end to end: real token, real database, real Prefect test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from pkcs11 import Attribute, KeyType, ObjectClass

from lifecycle.audit import trail
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import SessionKey
from lifecycle.inventory import db, meters
from lifecycle.policy import KeyId
from simulator.manufacturer import read_meter_secrets

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.mark.parametrize("vendor", ["acme", "borealis", "cygnus", "delta"])
def test_imports_every_format_and_rewraps_under_the_storage_kek(fleet, tmp_path: Path,
                                                                 vendor: str) -> None:
    files = fleet.batch(vendor, tmp_path, 60)
    state = fleet.run(files, vendor)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["imported"], summary["quarantined"], summary["records"]) == (60, 0, 60)
    assert sum(summary["by_suite"].values()) == 60
    secrets = {r["serial"]: r for r in read_meter_secrets(files.secrets)}
    with db.transaction(fleet.engine) as session:
        meter = meters.get_meter(session, next(iter(secrets)))
        versions = meters.key_versions(session, int(meter.id or 0))
    assert [v.key_id for v in versions] == [int(k) for k in KeyId]
    # Each blob is the meter's own key under its storage KEK. A usage key (GUEK, GBEK, GAK)
    # comes out for AES-GCM only: it seals a message that software opens with the meter's key.
    # The master key comes out for key wrap only: it wraps a key of known value, and software
    # unwraps that with the meter's master key (as the meter will, DLMS global_key_transfer).
    iv, aad = bytes(range(12)), b"\x30"
    assert {v.kek_label for v in versions if v.key_id != KeyId.KEK} == \
        {fleet.settings.storage_kek_label}
    assert [v.kek_label for v in versions if v.key_id == KeyId.KEK] == \
        [fleet.settings.master_kek_label]
    with Hsm.open(fleet.settings).session() as s:
        for version in versions:
            plain_key = bytes.fromhex(secrets[meter.serial][KeyId(version.key_id).field])
            assert plain_key not in version.blob
            with s.scoped(s.unwrap_stored(version.kek_label, version.blob)) as key:
                if version.key_id != KeyId.KEK:
                    sealed = s.gcm_encrypt(key, iv, aad, b"meterkeys", tag_bits=128)
                    assert AESGCM(plain_key).decrypt(iv, sealed, aad) == b"meterkeys"
                    continue
                known = os.urandom(16)
                probe = SessionKey(s._session.create_object({  # a key of known value, by test
                    Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.TOKEN: False, Attribute.VALUE: known,
                    Attribute.EXTRACTABLE: True}), 128)
                with s.scoped(probe):
                    assert aes_key_unwrap(plain_key, s.wrap_aes(key, probe)) == known


def test_rerun_imports_nothing_twice(fleet, tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 40)
    first = fleet.run(files, "acme").result()
    second = fleet.run(files, "acme").result()
    assert first["imported"] == 40
    assert second == first
    with db.transaction(fleet.engine) as session:
        assert meters.count_meters(session) == 40


def test_operator_role_is_required_and_refusal_is_audited(fleet, tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 5)
    state = fleet.run(files, "acme", principal="test-auditor")
    assert state.is_failed()
    with pytest.raises(Exception, match="may not perform 'batch.import'"):
        state.result()
    with db.snapshot(fleet.engine) as session:
        denied = [e for e in trail.events(session, limit=10) if e.outcome == "denied"]
    assert denied and denied[0].principal == "test-auditor"
    with db.transaction(fleet.engine) as session:
        assert meters.count_meters(session) == 0


def test_flow_process_keeps_no_transport_key_when_workers_do_the_work(fleet,
                                                                       tmp_path: Path) -> None:
    from lifecycle.factory_import import rewrap

    files = fleet.batch("acme", tmp_path, 20)
    state = fleet.run(files, "acme", workers=1)
    assert state.is_completed(), state.message
    assert state.result()["imported"] == 20
    # Verification unwrapped the transport key in this process; it must be destroyed again.
    assert rewrap.cached_transport_keys() == 0
