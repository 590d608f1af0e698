"""Flow runs in the tests send Prefect heartbeats only where a test asks for them
(``prefect_heartbeats``: the leak scans, which must see everything Prefect stores);
``tests/conftest.py`` says why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect import flow
from prefect.flow_engine import FlowRunEngine

pytestmark = pytest.mark.usefixtures("prefect_server")


@flow(name="heartbeat-probe", persist_result=False)
def _probe() -> int:
    return 1


@pytest.fixture
def heartbeats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The heartbeats the flow runs of a test send (flow run ids), Prefect's own sending kept."""
    sent: list[str] = []
    send = FlowRunEngine._emit_flow_run_heartbeat

    def counted(engine, *args, **kwargs):  # type: ignore[no-untyped-def]
        sent.append(str(engine.flow_run.id) if engine.flow_run else "")
        return send(engine, *args, **kwargs)

    monkeypatch.setattr(FlowRunEngine, "_emit_flow_run_heartbeat", counted)
    yield sent


def test_a_flow_run_sends_no_heartbeat_in_an_ordinary_test(heartbeats: list[str]) -> None:
    assert _probe() == 1
    assert heartbeats == []


@pytest.mark.prefect_heartbeats
def test_a_flow_run_sends_heartbeats_where_a_test_asks(heartbeats: list[str]) -> None:
    assert _probe() == 1
    assert len(heartbeats) >= 1, heartbeats
