"""The claim's tasks inside a Prefect flow run: what Prefect keeps of their results."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.context import FlowRunContext
from prefect.utilities.annotations import quote

from lifecycle.clock import utcnow
from lifecycle.hes.port import Outcome
from tasks import claim as t

pytestmark = pytest.mark.usefixtures("prefect_server")


class _AnsweringHes:
    """A HES that has an outcome for every order at once (no meter behind it)."""

    def __init__(self, order_ids: list[str]) -> None:
        self._pending = [Outcome(o, f"SIM{i:010d}", "ok", None, utcnow())
                         for i, o in enumerate(order_ids)]

    def outcomes(self) -> list[Outcome]:
        found, self._pending = self._pending, []
        return found


@flow(persist_result=False)
def _collect_twice(count: int) -> tuple[int, int]:
    """Collect two chunks of ``count`` outcomes; return how many results Prefect links to task
    runs for the rest of the flow run, before and after the second chunk."""
    links = FlowRunContext.get().run_results  # type: ignore[union-attr]
    sizes = []
    for chunk in range(2):
        ids = [f"CO-{chunk:02d}{i:014d}" for i in range(count)]
        collected = t.collect_outcomes(quote(_AnsweringHes(ids)), quote(ids), 0.0)
        assert len(getattr(collected, "outcomes", collected)) == count
        sizes.append(len(links))
    return sizes[0], sizes[1]


def test_a_chunks_outcomes_leave_no_link_per_outcome_in_the_flow_run() -> None:
    """Prefect links a task's result and each of its direct elements to the task run until
    the flow run ends. Returned as a list, every outcome of a claim stayed linked (two a
    meter, and the collections between chunks walked them all); a chunk now leaves a few
    links whatever its size."""
    first, second = _collect_twice(1000)
    assert first <= 5 and second - first <= 5, (first, second)
