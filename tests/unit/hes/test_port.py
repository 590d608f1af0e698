"""The HES port: orders and outcomes round-trip as JSON lines; a bad line is refused by file and
line; the file adapter writes privately and atomically."""

from __future__ import annotations

import json
import re
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lifecycle.hes.files import FileHes
from lifecycle.hes.port import (
    HEX_RUN,
    ORDER_ID_MAX,
    KeyOrder,
    Outcome,
    PortError,
    decode_orders,
    decode_outcomes,
    encode_lines,
    new_order_id,
    order_line,
    outcome_line,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
ORDER = KeyOrder("o-1", "ACM0000000001", "41434D0000000001", 1, bytes.fromhex("0101020216"),
                 bytes(range(16)), NOW)
OUTCOME = Outcome("o-1", "ACM0000000001", "ok", bytes.fromhex("DB08"), NOW)


def test_orders_and_outcomes_round_trip() -> None:
    assert decode_orders(encode_lines([order_line(ORDER)]), "f") == [ORDER]
    silent = Outcome("o-2", "ACM0000000002", "timeout", None, NOW)
    text = encode_lines([outcome_line(OUTCOME), "", outcome_line(silent)])
    assert decode_outcomes(text, "f") == [OUTCOME, silent]


def _outcome(**change: object) -> str:
    doc = json.loads(outcome_line(OUTCOME))
    doc.update(change)
    return json.dumps({k: v for k, v in doc.items() if v != "DROP"})


def _order(**change: object) -> str:
    doc = json.loads(order_line(ORDER))
    doc.update(change)
    return json.dumps({k: v for k, v in doc.items() if v != "DROP"})


@pytest.mark.parametrize(("line", "message"), [
    pytest.param("{", "not JSON", id="not-json"),
    pytest.param("[]", "not a JSON object", id="not-object"),
    pytest.param(_outcome(status="maybe"), "status 'maybe'", id="bad-status"),
    pytest.param(_outcome(proof_apdu="zz"), "proof_apdu is not hex", id="bad-hex"),
    pytest.param(_outcome(reported_at="2026-11-29T12:00:00"), "no time zone", id="naive-time"),
    pytest.param(_outcome(reported_at="yesterday"), "ISO 8601", id="bad-time"),
    pytest.param(_outcome(order_id="DROP"), "missing field order_id", id="missing"),
    pytest.param(_outcome(extra=1), "unknown field extra", id="unknown"),
    pytest.param(_outcome(order_id=7), "order_id has the wrong type", id="wrong-type"),
    pytest.param(_outcome(order_id=""), "order_id is empty", id="empty-id"),
    pytest.param(_outcome(order_id="CO-" + "ab" * 16), "32 hex digits", id="hex-run-id"),
    pytest.param(_outcome(order_id="CO-" + "x" * 38), "longer than 40", id="long-id"),
])
def test_bad_outcome_lines_are_refused_by_file_and_line(line: str, message: str) -> None:
    text = encode_lines([outcome_line(Outcome("o-0", "X", "failed", None, NOW)), line])
    with pytest.raises(PortError, match=message) as caught:
        decode_outcomes(text, "outcomes.jsonl")
    assert caught.value.where == "outcomes.jsonl line 2"


@pytest.mark.parametrize(("line", "message"), [
    pytest.param(_order(system_title="41434d0000000001"), "upper-case", id="lower-title"),
    pytest.param(_order(system_title="41434D00000001"), "16 upper-case", id="short-title"),
    pytest.param(_order(suite=3), "suite 3", id="bad-suite"),
    pytest.param(_order(suite=True), "suite has the wrong type", id="bool-suite"),
    pytest.param(_order(key_data="0g"), "key_data is not hex", id="bad-key-data"),
    pytest.param(_order(challenge="DROP"), "missing field challenge", id="no-challenge"),
])
def test_bad_order_lines_are_refused(line: str, message: str) -> None:
    with pytest.raises(PortError, match=message):
        decode_orders(line, "orders.jsonl")


def test_an_order_id_twice_is_refused() -> None:
    with pytest.raises(PortError, match="appears twice"):
        decode_outcomes(encode_lines([outcome_line(OUTCOME)] * 2), "f")


def test_file_hes_exports_privately_and_confirms(tmp_path: Path) -> None:
    hes = FileHes(tmp_path / "out" / "orders.jsonl", tmp_path / "outcomes.jsonl")
    assert hes.outcomes() == []
    hes.submit([ORDER])
    assert stat.S_IMODE(hes.orders_path.stat().st_mode) == 0o600
    assert decode_orders(hes.orders_path.read_text(), "f") == [ORDER]
    assert list(hes.orders_path.parent.iterdir()) == [hes.orders_path]  # no temporary left
    hes.outcomes_path.write_text(encode_lines([outcome_line(OUTCOME)]))
    assert hes.outcomes() == [OUTCOME] == FileHes.confirm(hes.outcomes_path)
    assert hes.prove("ACM0000000001", ORDER.system_title, bytes(16)) is None


def test_confirm_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PortError, match="cannot be read"):
        FileHes.confirm(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(PortError, match="bin.jsonl"):
        FileHes.confirm(tmp_path / "bin.jsonl")


def test_an_order_never_shows_its_bytes_in_repr() -> None:
    assert ORDER.key_data.hex() not in repr(ORDER)


def test_new_order_ids_sort_as_they_were_made_and_stay_unguessable() -> None:
    made = []
    for _ in range(20):
        made.append(new_order_id("CO"))
        time.sleep(0.002)  # the next millisecond
    assert sorted(made) == made  # a chunk's orders go to the end of the orders' index
    many = [new_order_id("CC") for _ in range(20_000)]
    assert len(set(many)) == len(many)
    assert len({i[-12:] for i in many}) == len(many)  # 48 random bits each, not a counter
    for order_id in made + many[:100]:
        assert re.fullmatch(r"C[OC]-[0-9A-F]{23}", order_id)
        assert len(order_id) <= ORDER_ID_MAX and not HEX_RUN.search(order_id)
    line = outcome_line(Outcome(made[0], "ACM0000000001", "ok", None, NOW))
    assert decode_outcomes(line + "\n", "f")[0].order_id == made[0]
