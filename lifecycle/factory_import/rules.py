"""The import's decisions, pure: which rows of a chunk are registered, skipped or quarantined.

Given plain data (the chunk's rows, the re-wrapped blobs, and who already holds each serial,
system title and wrapped key), ``sort_chunk`` decides without touching a database or an HSM, so
the rules can be read and tested as a table of scenarios. ``check_totals`` is the last word on a
batch: every record of the manifest is accounted for, exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lifecycle.errors import ChecksumError
from lifecycle.policy import KeyId

# (batch id, source row) of the meter that holds a serial or a system title.
Holder = tuple[int, int]


@dataclass
class Sorted:
    """What becomes of a chunk's rows: indexes registered, rows rejected, rows already stored."""

    accepted: list[int] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def sort_chunk(batch_id: int, rows: Sequence[int], serials: Sequence[str],
               titles: Sequence[str], blobs: Sequence[object | None],
               by_serial: dict[str, Holder], by_title: dict[str, Holder],
               digests: Sequence[Sequence[str]] = (),
               by_digest: dict[str, Holder] | None = None) -> Sorted:
    """Decide each row of a chunk, in file order.

    - A row whose serial is held by this very batch and row was stored by an earlier run of the
      same import: skipped (a re-run never duplicates).
    - A serial or system title held by another row is a duplicate: quarantined, naming the
      holder (this file's first row, or the batch and row in the inventory).
    - A wrapped key (``digests``: ``batch_format.source_digest`` of each of the row's keys, in
      key id order) seen before, in the same row, an earlier row, or any earlier delivery, is
      a duplicate: quarantined, naming the first holder. A key delivered twice is a replay, or
      a manufacturer that gave two meters one key; neither may be registered.
    - A row with a key whose RFC 3394 integrity check failed (``None`` blob) is quarantined,
      naming the first such key.
    - Every other row is accepted, and then holds its serial, title and keys for the rows
      after it.

    ``by_serial``, ``by_title`` and ``by_digest`` are updated with the accepted rows.
    """
    by_digest = {} if by_digest is None else by_digest
    per_meter = len(KeyId)
    out = Sorted()
    for i, row in enumerate(rows):
        serial, title = serials[i], titles[i]
        mine = (batch_id, row)
        if by_serial.get(serial) == mine:
            out.skipped += 1
            continue
        reason = (_duplicate("serial", by_serial.get(serial), batch_id)
                  or _duplicate("system_title", by_title.get(title), batch_id)
                  or (_duplicate_key(digests[i], by_digest, batch_id) if digests else None))
        meter_blobs = blobs[i * per_meter:(i + 1) * per_meter]
        if reason is None and None in meter_blobs:
            bad = KeyId(list(meter_blobs).index(None)).field
            reason = (bad, "key-wrap integrity check failed (tampered, or wrapped under "
                           "another transport key)")
        if reason is not None:
            out.rejects.append({"row": row, "field": reason[0], "reason": reason[1],
                                "serial": serial})
            continue
        out.accepted.append(i)
        by_serial[serial] = mine
        by_title[title] = mine
        if digests:
            by_digest.update(dict.fromkeys(digests[i], mine))
    return out


def check_totals(file: str, record_count: int, imported: int, quarantined: int) -> None:
    """Check that a batch's imported and quarantined rows are exactly its records.

    A re-run's skipped rows were imported by an earlier run, so the inventory's counts are the
    whole story: any other sum means rows came from elsewhere than the verified file (or some
    went missing), and the batch must not be reported complete.

    Raises:
        ChecksumError: the counts do not add up to the manifest's ``record_count``.
    """
    if imported + quarantined != record_count:
        raise ChecksumError(file, f"{imported} imported + {quarantined} quarantined rows differ "
                                  f"from the manifest's record_count {record_count}")


def _duplicate_key(digests: Sequence[str], by_digest: dict[str, Holder],
                   batch_id: int) -> tuple[str, str] | None:
    for n, digest in enumerate(digests):
        fld = KeyId(n).field
        if digest in digests[:n]:
            first = KeyId(list(digests).index(digest)).field
            return fld, f"duplicate wrapped key: same as {first} of this row"
        found = _duplicate("wrapped key", by_digest.get(digest), batch_id)
        if found is not None:
            return fld, found[1]
    return None


def _duplicate(fld: str, holder: Holder | None, batch_id: int) -> tuple[str, str] | None:
    if holder is None:
        return None
    if holder[0] == batch_id:
        return fld, f"duplicate {fld} in the file (first at row {holder[1]})"
    return fld, f"duplicate {fld}: already in the inventory (batch {holder[0]}, row {holder[1]})"
