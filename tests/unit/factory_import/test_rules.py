"""The import's pure decisions as scenario tables: duplicate wrapped keys and the batch total."""

from __future__ import annotations

from typing import Any

import pytest

from lifecycle.errors import ChecksumError
from lifecycle.factory_import.rules import check_totals, sort_chunk

BATCH = 7
BLOB = b"b" * 24


def _row(n: int, keys: tuple[str, str, str, str] | None = None) -> dict[str, Any]:
    return {"row": n, "serial": f"ACM{n:010d}", "title": f"41434D{n:010X}",
            "digests": keys or tuple(f"{n:02d}{k}" + "0" * 29 for k in "abcd")}


def _sort(rows: list[dict[str, Any]], by_digest: dict[str, tuple[int, int]] | None = None
          ) -> Any:
    return sort_chunk(BATCH, [r["row"] for r in rows], [r["serial"] for r in rows],
                      [r["title"] for r in rows], [BLOB] * (4 * len(rows)), {}, {},
                      [r["digests"] for r in rows], {} if by_digest is None else by_digest)


SAME = ("k1", "k2", "k3", "k4")
SCENARIOS = [
    pytest.param([_row(1), _row(2)], {}, [], id="distinct-keys-accepted"),
    pytest.param([_row(1, SAME), _row(2, SAME)], {},
                 [(2, "guek", "duplicate wrapped key in the file (first at row 1)")],
                 id="same-keys-in-two-rows"),
    pytest.param([_row(1), _row(2, ("x1", "x2", _row(1)["digests"][3], "x4"))], {},
                 [(2, "gak", "duplicate wrapped key in the file (first at row 1)")],
                 id="one-key-of-an-earlier-row"),
    pytest.param([_row(1, ("k1", "k1", "k3", "k4"))], {},
                 [(1, "gbek", "duplicate wrapped key: same as guek of this row")],
                 id="same-key-twice-in-a-row"),
    pytest.param([_row(1, SAME)], {"k4": (3, 12)},
                 [(1, "kek", "duplicate wrapped key: already in the inventory (batch 3, row 12)")],
                 id="key-of-an-earlier-delivery"),
    pytest.param([_row(1, SAME)], {"k2": (BATCH, 5)},
                 [(1, "gbek", "duplicate wrapped key in the file (first at row 5)")],
                 id="key-of-an-earlier-chunk-of-this-batch"),
]


@pytest.mark.parametrize(("rows", "known", "rejected"), SCENARIOS)
def test_a_wrapped_key_seen_twice_is_quarantined(rows: list[dict[str, Any]],
                                                 known: dict[str, tuple[int, int]],
                                                 rejected: list[tuple[int, str, str]]) -> None:
    decided = _sort(rows, dict(known))
    assert [(r["row"], r["field"], r["reason"]) for r in decided.rejects] == rejected
    assert len(decided.accepted) == len(rows) - len(rejected)


def test_quarantined_row_holds_no_key_and_serial_duplicate_is_named_first() -> None:
    first, second = _row(1, SAME), _row(2, SAME)
    second["serial"] = first["serial"]
    decided = _sort([first, second])
    assert [r["field"] for r in decided.rejects] == ["serial"]


@pytest.mark.parametrize(("count", "imported", "quarantined", "ok"), [
    pytest.param(6, 6, 0, True, id="all-imported"),
    pytest.param(6, 4, 2, True, id="some-quarantined"),
    pytest.param(0, 0, 0, True, id="empty"),
    pytest.param(6, 7, 0, False, id="seven-imported-of-six"),
    pytest.param(6, 5, 0, False, id="one-missing"),
    pytest.param(6, 6, 1, False, id="quarantine-planted"),
])
def test_totals_must_add_up_to_the_record_count(count: int, imported: int, quarantined: int,
                                                ok: bool) -> None:
    if ok:
        check_totals("a.csv", count, imported, quarantined)
        return
    with pytest.raises(ChecksumError, match=rf"^a\.csv: {imported} imported \+ {quarantined} "
                                            rf"quarantined rows differ from the manifest's "
                                            rf"record_count {count}$"):
        check_totals("a.csv", count, imported, quarantined)
