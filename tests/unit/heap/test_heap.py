"""The garbage collector paused for a bulk run: off inside, collected on demand, as it was after."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator

import pytest

from lifecycle import heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_paused_inside_and_restored_after() -> None:
    gc.enable()
    with heap.paused():
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0  # what the process held is out of every collection
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_cycle_waits_for_collect_then_goes() -> None:
    with heap.paused() as collect:
        dead = _cycle()
        # 50,000 objects held: with the collector on, these allocations start collections
        # that would free the cycle.
        junk = [object() for _ in range(50_000)]
        del junk
        assert dead() is not None
        assert collect() > 0
        assert dead() is None


def test_collector_left_off_stays_off() -> None:
    gc.disable()
    with heap.paused():
        pass
    assert not gc.isenabled()


def test_nested_runs_share_one_pause() -> None:
    gc.enable()
    with heap.paused():
        with heap.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer run is still on
        assert gc.get_freeze_count() > 0
    assert gc.isenabled()


def test_restored_when_the_run_fails() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), heap.paused():
        raise RuntimeError("chunk failed")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_concurrent_runs_restore_once_the_last_ends() -> None:
    gc.enable()
    inside, release = threading.Event(), threading.Event()

    def other_run() -> None:
        with heap.paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other_run)
    with heap.paused():
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other run still holds the pause
    release.set()
    thread.join(10)
    assert gc.isenabled()
