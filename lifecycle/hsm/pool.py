"""Bulk HSM work on spawned worker processes, one HSM login each.

Within one process PKCS#11 calls are serialised (``lifecycle.hsm.boundary``), so bulk work
scales by processes. Workers are started with ``spawn``: each loads the module and logs in by
itself from its own settings (the PIN is read from the environment or PIN file in the child; the
parent sends none). A job is a module-level function ``fn(settings, job)`` and its argument: both
cross the pipe by pickle, so neither may hold a PKCS#11 object, and what a process job sends and
returns must be wrapped key material at most, never a key in clear.

Errors pickle (``lifecycle.errors``): a job that raises a permanent HSM error in a worker fails
its future with that error, so the caller does not retry it. Only a worker that dies (killed,
crashed module) is a transient failure.

Plain worker processes are used rather than Prefect's ``ProcessPoolTaskRunner``: a worker that
imports only the HSM layer starts in well under a second, where one that imports Prefect takes
seconds and competes with the Prefect server for the same two cores.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from lifecycle.config import Settings, private_umask
from lifecycle.errors import PermanentHsmError, TransientHsmError
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import objects_made

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")
PARENT_CHECK_SECONDS = 0.5  # how soon a worker whose parent died ends


class _Worker:
    """Per-process state of a worker: its settings (read from the parent's, less the PINs)."""

    settings: Settings | None = None


def _init_worker(fields: dict[str, Any]) -> None:
    _die_with_parent()
    private_umask()  # inherited from the parent already, unless a host process never set it
    _Worker.settings = Settings(**fields)
    # Load the module and log in now, before the first job: the pool starts its workers when
    # it is made, so this happens while the caller still prepares its first jobs. A failure is
    # left to the first job, which reports it as its own error; raised here, it would break the
    # pool, and a broken pool is retried as a dead worker.
    with contextlib.suppress(Exception):
        Hsm.open(_Worker.settings)


def _started() -> None:
    """A job that does nothing: handing one to each worker starts them all at once."""


def _die_with_parent() -> None:
    # A worker whose parent was killed must not linger holding an HSM session: a thread of the
    # worker watches for the parent process to go (the worker is then re-parented) and ends the
    # worker at once. Not PR_SET_PDEATHSIG: Linux sends that signal when the *thread* that
    # started the worker ends, and workers are started by whichever thread makes or replaces the
    # pool (a caller's, or the pool's own that calls back when a job ends), so it killed healthy
    # workers, mid-job at times.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)  # nothing to clean up: the HSM session and its session keys end with us

    threading.Thread(target=watch, name="meterkeys-parent-watch", daemon=True).start()


def _run(fn: Callable[[Settings, Any], Any], job: Any) -> tuple[Any, int]:
    # The job's result, and how many HSM session objects it made (the pool's replacement bound).
    assert _Worker.settings is not None
    before = objects_made()
    return fn(_Worker.settings, job), objects_made() - before


class HsmWorkers:
    """A pool of N spawned HSM worker processes; with N == 0 the work runs in this process.

    A worker that dies breaks the pool: the job in flight fails with ``TransientHsmError`` and
    the next submission starts a fresh pool, so a retry succeeds. ``cleanup(settings)`` runs in
    this process on close when the work ran here (N == 0), to drop what jobs left in the HSM
    session; with workers, their sessions end with them.
    """

    def __init__(self, settings: Settings, workers: int,
                 cleanup: Callable[[Settings], None] | None = None) -> None:
        self.settings = settings
        self.workers = workers
        self._cleanup = cleanup
        self._lock = threading.RLock()  # RLock: a job done already calls back at once
        self._closed = False
        # Jobs not yet handed to the pool, most urgent first: (rank, order, fn, job, future).
        self._waiting: list[tuple[int, int, Callable[[Settings, Any], Any], Any,
                                  Future[Any]]] = []
        self._order = itertools.count()
        self._in_flight = 0  # handed to the pool, not yet done
        self._local = threading.local()
        self._made = 0  # HSM session objects the current pool's workers made
        self._retired: list[ProcessPoolExecutor] = []  # finishing their last jobs
        self._pool: ProcessPoolExecutor | None = self._start() if workers > 0 else None
        self._owner: weakref.WeakKeyDictionary[Future[Any], ProcessPoolExecutor] = \
            weakref.WeakKeyDictionary()

    def _start(self) -> ProcessPoolExecutor:
        fields = self.settings.model_dump(exclude={"pin", "so_pin"})
        self._made = 0
        pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(fields,))
        # The executor starts a worker per job as jobs come, and each then loads the module and
        # logs in (about 0.4 s) while the job waits. Started now, they do that while the caller
        # selects and loads its first work (and a replacement pool, while the old one finishes).
        for _ in range(self.workers):
            pool.submit(_started)
        return pool

    def _recycled(self) -> ProcessPoolExecutor:
        # SoftHSM2 2.6.1 never frees a destroyed session object (SoftHSMv2 issues 562 and 563:
        # the memory returns only at C_Finalize), about 120 bytes a key here. The workers are
        # therefore replaced by the work that leaks: the whole pool at once, once its workers
        # have made ``worker_recycle_objects`` session objects each (counted where they are
        # made, ``lifecycle.hsm.session.objects_made``; jobs that make none, such as
        # signatures, never bring a replacement closer). The old pool finishes the jobs it
        # holds and its processes then exit. Not ``ProcessPoolExecutor(max_tasks_per_child=
        # ...)``: up to Python 3.13 it stops running queued jobs once a worker exits at its
        # limit while others wait (CPython gh-115634), and a count of jobs says nothing of
        # their size.
        assert self._pool is not None
        if self._made >= self.workers * self.settings.worker_recycle_objects:
            self._pool.shutdown(wait=False)
            self._retired.append(self._pool)
            self._pool = self._start()
        return self._pool

    @contextlib.contextmanager
    def ranked(self, rank: int) -> Iterator[None]:
        """Give the jobs this thread submits inside the block ``rank`` (see ``submit``)."""
        outer = getattr(self._local, "rank", 0)
        self._local.rank = rank
        try:
            yield
        finally:
            self._local.rank = outer

    def submit(self, fn: Callable[[Settings, JobT], ResultT], job: JobT) -> Future[ResultT]:
        """Run ``fn(settings, job)`` on a worker (``fn`` must be a module-level function).

        The pool holds one job a worker; the others wait here, lowest rank first (``ranked``;
        0 outside it), in the order submitted within a rank. The claim ranks each chunk's jobs
        by the chunk's place: the workers finish what the flow waits for first (the current
        chunk's proofs) before the keys of the chunks made ahead.

        Raises:
            PermanentHsmError: the pool is closed (a task still running when its flow ended
                must not start workers again).
        """
        if self._closed:
            raise PermanentHsmError("worker job", "the HSM workers are closed")
        if self.workers == 0:
            done: Future[ResultT] = Future()
            try:
                done.set_result(fn(self.settings, job))
            except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
                done.set_exception(exc)
            return done
        future: Future[ResultT] = Future()
        with self._lock:
            rank = getattr(self._local, "rank", 0)
            heapq.heappush(self._waiting, (rank, next(self._order), fn, job, future))
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        # Under the lock: hand waiting jobs to the pool while a worker is free.
        while self._waiting and self._in_flight < self.workers and not self._closed:
            _, _, fn, job, future = heapq.heappop(self._waiting)
            if not future.set_running_or_notify_cancel():
                continue
            if self._pool is None:
                self._pool = self._start()
            try:
                inner = self._recycled().submit(_run, fn, job)
            except BrokenProcessPool:
                self._replace(self._pool)
                assert self._pool is not None
                inner = self._pool.submit(_run, fn, job)
            self._owner[future] = self._pool
            self._in_flight += 1
            inner.add_done_callback(functools.partial(self._finished, future))

    def _finished(self, future: Future[Any], inner: Future[Any]) -> None:
        cancelled = inner.cancelled()
        error = None if cancelled else inner.exception()
        result, made = (None, 0) if cancelled or error is not None else inner.result()
        with self._lock:
            self._in_flight -= 1
            if self._owner.get(future) is self._pool:  # a retired pool's work is done with it
                self._made += made
            self._dispatch()
        if cancelled:  # its pool was shut down: the caller's ``result`` says so
            future.set_exception(CancelledError())
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def result(self, future: Future[ResultT]) -> ResultT:
        """Wait for a job, translating a dead worker into a transient error.

        Raises:
            TransientHsmError: a worker process died (the pool is replaced for the retry).
            MeterkeysError: what the job raised (a permanent HSM error stays permanent).
        """
        try:
            return future.result()
        except (BrokenProcessPool, CancelledError):
            with self._lock:
                self._replace(self._owner.get(future))
            raise TransientHsmError("worker job", "an HSM worker process died") from None

    def _replace(self, broken: ProcessPoolExecutor | None) -> None:
        # Only the pool that broke is replaced: several jobs of it fail at once, and the first
        # to notice must not take a fresh pool (and its jobs) down with it.
        if broken is None or broken is not self._pool:
            return
        broken.shutdown(wait=False, cancel_futures=True)
        self._pool = self._start()

    def close(self) -> None:
        """Stop the workers; their sessions, and the session keys in them, end with them."""
        with self._lock:
            self._closed = True
            for *_, future in self._waiting:
                future.cancel()
            self._waiting.clear()
            pools = [*self._retired, *([self._pool] if self._pool else [])]
            self._retired.clear()
            self._pool = None
        if self.workers == 0:
            if self._cleanup is not None:
                self._cleanup(self.settings)
            return
        # Outside the lock: a job finishing meanwhile calls back into it (``_finished``), from
        # the thread that the shutdown waits for.
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> HsmWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["HsmWorkers"]
