"""The ownership claim end to end: real token, real database, simulated HES and meters."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lifecycle.audit import trail
from lifecycle.hsm.connection import Hsm
from lifecycle.inventory import db, meters
from lifecycle.policy import KeyId

pytestmark = pytest.mark.usefixtures("prefect_server")


def key_states(engine, serial: str) -> dict[tuple[int, int], str]:  # type: ignore[no-untyped-def]
    with db.transaction(engine) as session:
        meter = meters.get_meter(session, serial)
        return {(k.key_id, k.version): k.state
                for k in meters.key_versions(session, int(meter.id or 0))}


def meter_state(engine, serial: str) -> str:  # type: ignore[no-untyped-def]
    with db.transaction(engine) as session:
        return meters.get_meter(session, serial).state


CLAIMED = {(int(k), 1): "destroyed" for k in KeyId} | {(int(k), 2): "active" for k in KeyId}
FACTORY = {(int(k), 1): "active" for k in KeyId} | {(int(k), 2): "pending" for k in KeyId}


def holds_usage_keys(settings, engine, serial: str, meter_keys, version: int) -> bool:  # type: ignore[no-untyped-def]
    """Whether the inventory's GUEK/GBEK/GAK of ``version`` are the keys the meter holds (an
    HSM GCM encryption against the meter's own key)."""
    iv, aad = bytes(12), b"\x30"
    with db.transaction(engine) as session:
        meter = meters.get_meter(session, serial)
        rows = {k.key_id: k for k in meters.key_versions(session, int(meter.id or 0))
                if k.version == version}
    with Hsm.open(settings).session() as s:
        for key_id in (KeyId.GUEK, KeyId.GBEK, KeyId.GAK):
            row = rows[int(key_id)]
            with s.scoped(s.unwrap_stored(row.kek_label, bytes(row.blob))) as key:
                sealed = s.gcm_encrypt(key, iv, aad, b"probe", tag_bits=128)
            if AESGCM(meter_keys[key_id]).encrypt(iv, b"probe", aad) != sealed:
                return False
    return True


def test_every_mode_ends_as_it_should(claim_fleet) -> None:  # type: ignore[no-untyped-def]
    serials = claim_fleet.serials
    modes = {serials[1]: "fail", serials[2]: "silent", serials[3]: "lie_nak",
             serials[4]: "lie_ok", serials[5]: "partial:1", serials[6]: "partial:3"}
    claim_fleet.set_modes(modes)
    state = claim_fleet.run(vendor="acme")
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["claimed"]) == {serials[0], serials[7], serials[8]}
    assert set(result["recovered"]) == {serials[3], serials[6]}
    assert serials[2] in result["waiting"]  # silent: its orders were never answered
    assert set(result["failed"]) | set(result["waiting"]) == {serials[1], serials[2],
                                                               serials[4], serials[5]}
    hes = claim_fleet.hes()
    for serial in [serials[0], serials[3], serials[6], serials[7], serials[8]]:
        assert key_states(claim_fleet.engine, serial) == CLAIMED, serial
        assert meter_state(claim_fleet.engine, serial) == "operational"
        assert holds_usage_keys(claim_fleet.settings, claim_fleet.engine, serial,
                                hes.meters[serial].keys, 2)
    for serial in [serials[1], serials[2], serials[4]]:
        assert key_states(claim_fleet.engine, serial) == FACTORY, serial
        assert meter_state(claim_fleet.engine, serial) == "claimed"
        assert holds_usage_keys(claim_fleet.settings, claim_fleet.engine, serial,
                                hes.meters[serial].keys, 1)
    # The destroyed factory blobs are gone, and the manufacturer's access is recorded as ended.
    with db.transaction(claim_fleet.engine) as session:
        meter = meters.get_meter(session, serials[0])
        assert meter.manufacturer_access_ended_at is not None
        old = [k for k in meters.key_versions(session, int(meter.id or 0)) if k.version == 1]
        assert all(bytes(k.blob) == b"" and k.destroyed_at is not None for k in old)

    # A later run, the meters now behaving, claims the rest with the same pending keys.
    claim_fleet.set_modes({s: "ok" for s in modes})
    again = claim_fleet.run(vendor="acme")
    assert again.is_completed(), again.message
    for serial in serials:
        assert key_states(claim_fleet.engine, serial) == CLAIMED, serial
    with db.snapshot(claim_fleet.engine) as session:
        events = trail.events(session, limit=5000)
    assert any(e.action == "meter.claim" for e in events)


class _Overlaps:
    """A HES that counts how many of its calls ran at once (each call lingers a little)."""

    def __init__(self, hes) -> None:  # type: ignore[no-untyped-def]
        import threading

        self.hes, self.now, self.most = hes, 0, 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        import time

        value = getattr(self.hes, name)

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            with self._lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(0.05)
                return value(*args, **kwargs)
            finally:
                with self._lock:
                    self.now -= 1
        return call


def test_the_hes_gets_one_call_at_a_time_from_the_threaded_claim(claim_fleet,  # type: ignore[no-untyped-def]
                                                                  monkeypatch) -> None:
    """Chunks of two meters: keys are made ahead, chunks certified while others settle, all in
    threads; the HES adapter (here the simulator, whose state file two calls at once would
    clobber) still sees its calls one after the other."""
    import hes_adapters
    from tasks import context

    opened = []
    real = hes_adapters.open_hes

    def watched(settings):  # type: ignore[no-untyped-def]
        opened.append(_Overlaps(real(settings)))
        return opened[-1]

    monkeypatch.setattr(hes_adapters, "open_hes", watched)
    monkeypatch.setenv("METERKEYS_CLAIM_CHUNK_SIZE", "2")
    context.reset()
    state = claim_fleet.run(vendor="acme")
    assert state.is_completed(), state.message
    assert len(state.result()["claimed"]) == 9
    assert opened and opened[0].most == 1, [o.most for o in opened]
