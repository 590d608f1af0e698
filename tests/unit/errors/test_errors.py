"""Every project error survives pickling: errors cross from HSM workers to the tasks."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lifecycle import errors
from lifecycle.errors import MeterkeysError

EXAMPLES: dict[type[MeterkeysError], MeterkeysError] = {
    errors.MeterkeysError: errors.MeterkeysError("something failed"),
    errors.ConfigError: errors.ConfigError("no PKCS#11 module"),
    errors.TokenBusy: errors.TokenBusy(Path("/var/tokens"), True, 10.0),
    errors.HsmError: errors.HsmError("sign", "DeviceError", "audit-key"),
    errors.TransientHsmError: errors.TransientHsmError("worker job", "worker died"),
    errors.PermanentHsmError: errors.PermanentHsmError("unwrap", "MechanismInvalid", "kek"),
    errors.KeyNotFound: errors.KeyNotFound("find key", "no such key", "meterkeys-import-x"),
    errors.IntegrityError: errors.IntegrityError("AES key unwrap", "WrappedKeyInvalid"),
    errors.KeyPolicyError: errors.KeyPolicyError("storage KEK", "meterkeys-storage-kek",
                                                 "CKA_DECRYPT is true; policy: false"),
    errors.InventoryError: errors.InventoryError("unknown meter 'X1'"),
    errors.AccessDenied: errors.AccessDenied("olga", "operator", "hsm.backup"),
    errors.RequestError: errors.RequestError("request 1 field 'time'", "not ISO 8601",
                                             principal="olga", action="batch.import"),
    errors.ReplayedRequest: errors.ReplayedRequest("request by 'olga'", "nonce already used",
                                                   principal="olga", action="hsm.backup"),
    errors.AuditError: errors.AuditError(7, "hash mismatch: the event was altered"),
    errors.BackupError: errors.BackupError(Path("/backups/1"), "manifest is missing"),
    errors.PkiError: errors.PkiError("CA device-p256", "no certificate in the inventory"),
    errors.FactoryTrustError: errors.FactoryTrustError("ACM0000000001", "wrong curve"),
    errors.DlmsError: errors.DlmsError("key_data offset 3", "not an enum"),
    errors.CounterReplayed: errors.CounterReplayed("meter ACM0000000001", "counter 5 <= 7"),
    errors.ProofRefused: errors.ProofRefused("meter ACM0000000001", "ciphertext differs"),
    errors.PortError: errors.PortError("outcomes.jsonl line 3", "unknown status"),
    errors.ClaimError: errors.ClaimError("order O-1", "not pending"),
    errors.BatchError: errors.BatchError("a.csv", "file is empty"),
    errors.ManifestError: errors.ManifestError("a.csv", "manifest signature does not verify"),
    errors.ChecksumError: errors.ChecksumError("a.csv", "file holds 3 records, manifest says 4"),
}


def _every_subclass(cls: type[MeterkeysError]) -> set[type[MeterkeysError]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _every_subclass(sub)
    return found


def test_every_error_class_has_an_example() -> None:
    # A new error class without an example here would go untested: add it to EXAMPLES.
    assert _every_subclass(MeterkeysError) <= set(EXAMPLES)


@pytest.mark.parametrize("error", list(EXAMPLES.values()), ids=lambda e: type(e).__name__)
def test_error_round_trips_through_pickle(error: MeterkeysError) -> None:
    again = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert again.args == error.args
    assert vars(again) == vars(error)
