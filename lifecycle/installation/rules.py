"""Which token backup may be restored: generations and pinned keys, decided on plain data.

A restore must never silently bring back an older token: it could hold a key that was destroyed
since, or lack one made since (a vendor's import key), and keys a PIN holder was meant to lose
would come back (NIST SP 800-57 Part 1 §8.3.4: restoring a key from backup is an accountable act).
So a backup's generation (signed into its manifest) must be the latest one recorded in the
inventory, recorded with the same manifest digest; and the backup's pinned keys must be the
inventory's. A security officer may force a restore past the generation and key-set rules (the
inventory itself was restored, say); never past a key that differs from its pin, since every
blob of the inventory was made under the pinned key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lifecycle.errors import BackupError

# role -> (label, CKA_ID hex, check value hex)
Pins = Mapping[str, tuple[str, str, str]]


@dataclass(frozen=True)
class RestoreFacts:
    """What a restore decision needs: the backup's signed claims and the inventory's records."""

    generation: int
    manifest_sha256: str
    backup_pins: Pins
    latest_generation: int
    recorded_sha256: str | None
    inventory_pins: Pins


def restore_refusals(facts: RestoreFacts) -> tuple[list[str], list[str]]:
    """Return (reasons a force may override, reasons nothing overrides); empty lists: restore.

    Never raises: ``decide_restore`` turns the reasons into a refusal.
    """
    forcible: list[str] = []
    fatal: list[str] = []
    if facts.generation < facts.latest_generation:
        forcible.append(f"generation {facts.generation} is older than the latest backup "
                        f"recorded, generation {facts.latest_generation}")
    if facts.recorded_sha256 is None:
        forcible.append(f"generation {facts.generation} is not recorded in this inventory")
    elif facts.recorded_sha256 != facts.manifest_sha256:
        forcible.append(f"generation {facts.generation} was recorded with another manifest")
    for role in sorted(set(facts.backup_pins) | set(facts.inventory_pins)):
        held, pinned = facts.backup_pins.get(role), facts.inventory_pins.get(role)
        if held is None:
            forcible.append(f"the backup lacks key role {role!r} (made after it)")
        elif pinned is None:
            forcible.append(f"the backup holds key role {role!r}, which this inventory does "
                            "not pin")
        elif held != pinned:
            fatal.append(f"key role {role!r} in the backup is not the pinned key (label, "
                         "CKA_ID or check value differ): the inventory's blobs need the pinned "
                         "one")
    return forcible, fatal


def decide_restore(facts: RestoreFacts, *, force: bool, where: Path) -> list[str]:
    """Allow or refuse a restore; return the refusals a force overrode (for the audit event).

    Raises:
        BackupError: a refusal, naming each reason (``where`` names the backup).
    """
    forcible, fatal = restore_refusals(facts)
    if fatal:
        raise BackupError(where, "; ".join(fatal))
    if forcible and not force:
        raise BackupError(where, "; ".join(forcible) + ": refused (a security officer "
                                        "may force it: meterkeys hsm restore --force)")
    return forcible
