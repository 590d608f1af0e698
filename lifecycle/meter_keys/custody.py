"""Key blobs in custody: verify every binding in bulk, and open one blob for use only if bound.

Both refuse a blob whose MAC (``lifecycle.meter_keys.binding``) does not verify in the HSM: a
blob moved to another meter, key id or version, swapped with another, or planted by someone who
can write the inventory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import IntegrityError
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import HsmSession, SessionKey
from lifecycle.inventory import meters
from lifecycle.inventory.db import Engine, snapshot, transaction
from lifecycle.meter_keys.binding import BlobContext, message

CHUNK = 5000


@dataclass(frozen=True)
class BadBlob:
    """A key blob that failed verification, named by meter, key id and version."""

    serial: str
    key_id: int
    version: int
    reason: str


@dataclass
class VerifyReport:
    """What ``verify_all`` found: blobs checked and those that failed."""

    checked: int = 0
    bad: list[BadBlob] = field(default_factory=list)


def context_of(row: Any) -> BlobContext:
    """Return the binding context of a stored blob row (``meters.stream_blobs``)."""
    return BlobContext(row.serial, row.system_title, int(row.key_id), int(row.version),
                       row.kek_label)


def verify_all(settings: Settings, engine: Engine, actor: Actor, now: datetime,
               progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Verify the MAC of every stored blob in the HSM, in chunks, on one snapshot; audit it.

    ``progress(done, total)`` is called after each chunk.

    Raises:
        HsmError: the HSM failed as a whole (a blob that does not verify is reported, not raised).
    """
    report = VerifyReport()
    with snapshot(engine) as session:
        total = meters.count_blobs(session)
        for rows in meters.stream_blobs(session, CHUNK):
            _verify_chunk(settings, rows, report)
            if progress is not None:
                progress(report.checked, total)
    with transaction(engine) as session:
        trail.record(session, actor, "inventory.verify", "failed" if report.bad else "ok",
                     detail={"checked": report.checked, "failed": len(report.bad)}, at=now)
    return report


def _verify_chunk(settings: Settings, rows: Sequence[Any], report: VerifyReport) -> None:
    bound = [r for r in rows if r.mac is not None]
    report.bad += [BadBlob(r.serial, int(r.key_id), int(r.version), "no MAC: the blob is not "
                           "bound to its meter") for r in rows if r.mac is None]
    with Hsm.open(settings).session() as hs:
        ok = hs.verify_mac(settings.blob_mac_label,
                           [message(context_of(r), bytes(r.blob)) for r in bound],
                           [bytes(r.mac) for r in bound])
    report.bad += [BadBlob(r.serial, int(r.key_id), int(r.version), "MAC does not verify: "
                           "the blob was moved, swapped or planted")
                   for r, good in zip(bound, ok, strict=True) if not good]
    report.checked += len(rows)


def open_stored(hs: HsmSession, settings: Settings, row: Any) -> SessionKey:
    """Verify a stored blob's binding, then unwrap it under its KEK into a session key.

    The key comes out with the usages its KEK's unwrap template grants, never extractable.

    Raises:
        IntegrityError: the blob is not bound to this meter, key id and version (moved,
            swapped or planted), or it does not unwrap.
    """
    context = context_of(row)
    if row.mac is None or not hs.verify_mac(settings.blob_mac_label,
                                            [message(context, bytes(row.blob))],
                                            [bytes(row.mac)])[0]:
        raise IntegrityError("open key blob", f"blob of meter {context.serial} key "
                             f"{context.key_id} version {context.version} is not bound to it "
                             "(moved, swapped or planted)", context.kek_label)
    return hs.unwrap_stored(context.kek_label, bytes(row.blob))
