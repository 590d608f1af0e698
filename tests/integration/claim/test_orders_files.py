"""A HES reached through files only: `meterkeys orders export` / `confirm` carry key orders,
certificate requests and certificates, one typed JSON line each (docs/hes-files.md); a file HES
keeps every chunk's orders; a bad answer line is named and refused, the good ones taken."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from cli.main import app
from lifecycle.audit.chain import Actor
from lifecycle.claim import steps
from lifecycle.clock import utcnow
from lifecycle.hes.files import CSR_ASKS, FileHes
from lifecycle.hes.port import (
    CertificateImport,
    KeyOrder,
    MeterRef,
    decode_meters,
    decode_orders,
    encode_lines,
    typed_line,
)
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.inventory import db, meters

from .test_certificates import events, run_ceremony, suites_of

pytestmark = pytest.mark.usefixtures("prefect_server")
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _order(order_id: str, serial: str) -> KeyOrder:
    return KeyOrder(order_id, serial, "41434D0000000001", 1, b"\x01", bytes(16), NOW)


def test_a_file_hes_keeps_every_chunk_until_an_attempt_supersedes_it(tmp_path: Path) -> None:
    hes = FileHes(tmp_path / "orders.jsonl", tmp_path / "outcomes.jsonl")
    first = [_order("CO-1", "M1"), _order("CO-2", "M1")]
    second = [_order("CO-3", "M2"), _order("CO-4", "M2")]
    hes.submit(first)
    hes.submit(second)
    hes.submit(second)  # the same orders again: not twice
    held = decode_orders(hes.orders_path.read_text(), "orders")  # refuses an id twice
    assert [o.order_id for o in held] == ["CO-1", "CO-2", "CO-3", "CO-4"]
    assert stat.S_IMODE(hes.orders_path.stat().st_mode) == 0o600
    hes.submit([_order("CO-5", "M1"), _order("CO-6", "M1")])  # M1's next attempt
    held = decode_orders(hes.orders_path.read_text(), "orders")
    assert [o.order_id for o in held] == ["CO-3", "CO-4", "CO-5", "CO-6"]
    refs = [MeterRef("M1", "41434D0000000001", 1), MeterRef("M2", "41434D0000000002", 2)]
    hes.certificate_requests(refs[:1])
    hes.certificate_requests(refs)
    assert decode_meters((tmp_path / CSR_ASKS).read_text(), "asks") == refs


@pytest.fixture
def cli(claim_fleet, monkeypatch):  # type: ignore[no-untyped-def]
    runner = CliRunner()
    ids = claim_fleet.fleet.ids

    def invoke(*args: str) -> Any:
        """Run a command as the test operator."""
        monkeypatch.setenv("METERKEYS_PRINCIPAL_KEY", str(ids.key_path("test-operator")))
        from cli import common
        from tasks import context

        context.settings.cache_clear()
        common.signer.cache_clear()
        return runner.invoke(app, list(args))

    return invoke


def _kinds(path: Path) -> dict[str, set[str]]:
    """type -> meter serials, of a typed file."""
    out: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        out.setdefault(doc["type"], set()).add(doc["meter_serial"])
    return out


def _states(engine) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with db.transaction(engine) as session:
        return {m.serial: m.state for m in meters.list_meters(session, limit=10_000)}


def _certificate_orders(engine) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT order_id, status FROM certificate_order ORDER BY order_id"))]


def _prepare(cf, serials: list[str]) -> None:  # type: ignore[no-untyped-def]
    ids = steps.select_meters(cf.engine, steps.Selection(serials=tuple(serials)))
    _, report = steps.prepare_chunk(HsmWorkers(cf.settings, 0), cf.engine, cf.settings,
                                    Actor("test-operator", "operator"), ids, utcnow())
    assert not report.failed


def _round(cf, cli, folder: Path, n: int) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """Export, let the simulated HES answer the file, return (export, answers)."""
    export, answers = folder / f"export-{n}.jsonl", folder / f"answers-{n}.jsonl"
    done = cli("orders", "export", str(export))
    assert done.exit_code == 0, done.output
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    cf.hes().answer_file(export, answers)
    return export, answers


def test_a_fleet_claimed_and_certified_through_files_only(claim_fleet, cli, tmp_path,  # type: ignore[no-untyped-def]
                                                          monkeypatch) -> None:
    cf = claim_fleet
    run_ceremony(cf.fleet)
    suites = suites_of(cf.engine)
    certified = {s for s, n in suites.items() if n in (1, 2)}
    # The flow's own submits go to a file HES too, in chunks of four: none may be lost.
    hes_files = tmp_path / "hes-files"
    monkeypatch.setenv("METERKEYS_HES", f"file:{hes_files}")
    monkeypatch.setenv("METERKEYS_CLAIM_CHUNK_SIZE", "4")
    claimed = cli("claim", "--vendor", "acme", "--wait", "0", "--workers", "0")
    assert claimed.exit_code == 0, claimed.output
    chunked = decode_orders((hes_files / "orders.jsonl").read_text(), "orders.jsonl")
    assert len(chunked) == 2 * len(suites)
    assert {o.meter_serial for o in chunked} == set(suites)

    # 1. key orders out, outcomes back: the meters are the DSO's.
    export, answers = _round(cf, cli, tmp_path, 1)
    assert _kinds(export) == {"key_order": set(suites)}
    done = cli("orders", "confirm", str(answers))
    assert done.exit_code == 0, done.output
    assert set(_states(cf.engine).values()) == {"operational"}

    # 2. the suite 1/2 meters asked for requests; their answers certified in the HSM.
    export, answers = _round(cf, cli, tmp_path, 2)
    assert _kinds(export) == {"csr_ask": certified}
    done = cli("orders", "confirm", str(answers))
    assert done.exit_code == 0, done.output
    issued = _certificate_orders(cf.engine)
    assert len(issued) == len(certified) and {s for _, s in issued} == {"pending"}
    again = cli("orders", "confirm", str(answers))  # the same file twice: nothing duplicated
    assert again.exit_code == 0, again.output
    assert _certificate_orders(cf.engine) == issued
    ignored = [str(s) for outcome, s, _ in events(cf.engine, "claim.certify")
               if outcome == "ignored"]
    assert sorted(ignored) == sorted(certified)

    # A HES reporting one meter's certificate order as imported on another: nothing changes.
    order_id, wrong = issued[0][0], sorted(set(suites) - certified)[0]
    lie = tmp_path / "lie.jsonl"
    lie.write_text(encode_lines([typed_line(CertificateImport(order_id, wrong, "ok", utcnow()))]))
    assert cli("orders", "confirm", str(lie)).exit_code == 0
    assert _certificate_orders(cf.engine) == issued

    # 3. certificate orders out, imports confirmed: delivered, the meters hold them.
    export, answers = _round(cf, cli, tmp_path, 3)
    assert _kinds(export) == {"certificate_order": certified}
    done = cli("orders", "confirm", str(answers))
    assert done.exit_code == 0, done.output
    assert {s for _, s in _certificate_orders(cf.engine)} == {"delivered"}
    held = cf.hes().meters
    assert all(set(held[s].certificates) == {"signature", "key_agreement"} for s in certified)
    assert cli("orders", "confirm", str(answers)).exit_code == 0
    imports = events(cf.engine, "claim.certificates.import")
    assert sorted(o for o, _, _ in imports) == ["ignored"] * (len(certified) + 1) + \
        ["ok"] * len(certified)
    last, _ = _round(cf, cli, tmp_path, 4)
    assert last.read_text() == ""


def test_bad_answer_lines_are_named_and_refused_and_the_good_ones_kept(  # type: ignore[no-untyped-def]
        claim_fleet, cli, tmp_path) -> None:
    cf = claim_fleet
    other = cf.serials[0]
    _prepare(cf, [other])  # its orders wait for a HES
    export, answers = _round(cf, cli, tmp_path, 1)
    good = answers.read_text().splitlines()
    assert len(good) == 2
    outcome = json.loads(good[0])
    foreign = typed_line(CertificateImport("CC-0000000000000000", other, "ok", utcnow()))
    bad = [
        "{",  # line 2
        json.dumps({**outcome, "extra": 1}),  # 3
        json.dumps({**outcome, "status": "maybe"}),  # 4
        json.dumps({k: v for k, v in outcome.items() if k != "type"}),  # 5
        json.dumps({**outcome, "type": "key_order"}),  # 6: an export kind in an answer
        good[0],  # 7: the same order twice (the first stands)
        json.dumps({**outcome, "type": "csrs"}),  # 8
    ]
    answers.write_text(encode_lines([good[0], *bad, good[1], foreign]))
    done = cli("orders", "confirm", str(answers))
    assert done.exit_code == 1
    said = " ".join(done.output.split())
    for number, reason in [(2, "not JSON"), (3, "unknown field extra"), (4, "status 'maybe'"),
                           (5, "missing field type"), (6, "type is not one of"),
                           (7, f"outcome '{outcome['order_id']}' appears twice"),
                           (8, "missing field")]:
        assert f"line {number}: {reason}" in said, (number, said)
    assert _states(cf.engine)[other] == "operational"  # the good lines were settled
    assert events(cf.engine, "claim.confirm")[0][2]["lines"] == len(bad)
    assert [(o, s) for o, s, _ in events(cf.engine, "claim.certificates.import")] == \
        [("ignored", other)]
    assert _certificate_orders(cf.engine) == []
