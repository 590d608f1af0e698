"""Which token backup may be restored (lifecycle.installation.rules), as a scenario table."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.errors import BackupError
from lifecycle.installation.rules import RestoreFacts, decide_restore

KEK = ("meterkeys-storage-kek", "11" * 16, "aa" * 24)
AUDIT = ("meterkeys-audit-signing", "22" * 16, "bb" * 32)
VENDOR = ("meterkeys-import-acme", "33" * 16, "cc" * 32)
PINS = {"storage-kek": KEK, "audit-signing": AUDIT}


def facts(**changes: object) -> RestoreFacts:
    base: dict[str, object] = dict(generation=3, manifest_sha256="m3", backup_pins=PINS,
                                   latest_generation=3, recorded_sha256="m3",
                                   inventory_pins=PINS)
    return RestoreFacts(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("case, forced_reason", [
    pytest.param(facts(generation=2, manifest_sha256="m2", recorded_sha256="m2"),
                 "generation 2 is older than the latest backup recorded, generation 3",
                 id="older-generation"),
    pytest.param(facts(recorded_sha256=None), "generation 3 is not recorded", id="unrecorded"),
    pytest.param(facts(recorded_sha256="other"), "recorded with another manifest",
                 id="other-manifest-same-generation"),
    pytest.param(facts(inventory_pins={**PINS, "import:acme": VENDOR}),
                 "the backup lacks key role 'import:acme'", id="key-made-after-backup"),
    pytest.param(facts(backup_pins={**PINS, "import:acme": VENDOR}),
                 "which this inventory does not pin", id="key-unknown-to-inventory"),
])
def test_refused_unless_forced(case: RestoreFacts, forced_reason: str) -> None:
    with pytest.raises(BackupError, match="may force it"):
        decide_restore(case, force=False, where=Path("b"))
    overridden = decide_restore(case, force=True, where=Path("b"))
    assert any(forced_reason in reason for reason in overridden)


@pytest.mark.parametrize("case", [
    pytest.param(facts(backup_pins={**PINS, "storage-kek": (KEK[0], "00" * 16, KEK[2])}),
                 id="other-cka-id"),
    pytest.param(facts(backup_pins={**PINS, "storage-kek": (KEK[0], KEK[1], "00" * 24)}),
                 id="other-check-value"),
    pytest.param(facts(generation=1, backup_pins={**PINS, "storage-kek": ("x", *KEK[1:])}),
                 id="other-label-and-older"),
])
def test_a_key_other_than_its_pin_is_refused_even_forced(case: RestoreFacts) -> None:
    for force in (False, True):
        with pytest.raises(BackupError, match="'storage-kek' in the backup is not the pinned"):
            decide_restore(case, force=force, where=Path("b"))


def test_latest_recorded_generation_with_the_same_keys_restores_unforced() -> None:
    assert decide_restore(facts(), force=False, where=Path("b")) == []
