"""The cyclic garbage collector of a bulk run: paused, and run once a chunk.

CPython starts a collection whenever allocations outrun deallocations by a threshold (700
objects for the youngest generation), and every so often a full one, which walks every object
the process tracks. A bulk run's process tracks millions (Prefect, SQLAlchemy, the chunks of
meters in flight) and allocates fast, so its collections cost more than the run's own Python:
an ownership claim of 20,000 meters spent 1.16 ms of processor time a meter in the flow's
process with automatic collection and 0.72 ms without it.

``paused()`` freezes what the process holds when the run starts (moved out of every
collection: modules, Prefect, the engine), turns automatic collection off, and gives the run a
``collect()`` to call between chunks, which frees the cycles of the chunk just done by walking
only what was made since the run started. Memory stays bounded by what one chunk leaves in
cycles; objects freed by reference counting (nearly all) go at once as always. Nested or
concurrent runs in one process share one pause: the collector comes back as it was when the
last of them ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Iterator

_lock = threading.Lock()
_runs = 0
_was_enabled = True


@contextlib.contextmanager
def paused() -> Iterator[Callable[[], int]]:
    """Pause automatic collection for a bulk run; yield the call that collects between chunks
    (it returns how many unreachable objects it found)."""
    global _runs, _was_enabled
    with _lock:
        if _runs == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
            gc.freeze()
        _runs += 1
    try:
        yield gc.collect
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0:
                gc.unfreeze()
                if _was_enabled:
                    gc.enable()


__all__ = ["paused"]
