"""Bulk HSM work on spawned worker processes, one HSM login each.

Within one process PKCS#11 calls are serialised (``lifecycle.hsm``), so bulk work scales by
processes. Workers are started with ``spawn``: each loads the module and logs in by itself from
its own settings (the PIN is read from the environment or PIN file in the child; the parent
sends none). The parent never hands a PKCS#11 object to a child. What crosses the pipe is wrapped
key material only: keys wrapped under the transport key going in, blobs wrapped under the
storage KEK coming out.

Plain worker processes are used rather than Prefect's ``ProcessPoolTaskRunner``: a worker that
imports only ``lifecycle.hsm`` starts in well under a second, where one that imports Prefect
takes seconds and competes with the Prefect server for the same two cores.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from lifecycle.config import Settings
from lifecycle.errors import TransientHsmError

_TRANSPORT_CACHE = 4


@dataclass(frozen=True)
class RewrapJob:
    """Re-wrap keys from a batch transport key to the storage KEK.

    ``wrapped_transport_key`` is the transport key RSA-OAEP-wrapped under the vendor import key:
    each worker unwraps it once per batch and keeps the session object for later jobs.
    """

    import_key_label: str
    oaep_hash: str
    wrapped_transport_key: bytes
    keys: Sequence[bytes]
    kek_label: str


class _Worker:
    """Per-process state of a worker: the HSM connection and cached transport keys."""

    settings: Settings | None = None
    transports: OrderedDict[bytes, Any] = OrderedDict()


def _init_worker(fields: dict[str, Any]) -> None:
    _die_with_parent()
    _Worker.settings = Settings(**fields)


def _die_with_parent() -> None:
    # A worker whose parent was killed must not linger holding an HSM session.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_rewrap(settings: Settings, job: RewrapJob) -> list[bytes | None]:
    """Run a re-wrap job in this process; ``None`` marks a key whose integrity check failed.

    Raises:
        HsmError: the transport key does not unwrap, or the HSM fails as a whole.
    """
    from lifecycle.hsm import Hsm

    with Hsm.open(settings).session() as session:
        token = hashlib.sha256(job.wrapped_transport_key + job.import_key_label.encode()).digest()
        transport = _Worker.transports.get(token)
        if transport is None or transport.destroyed:
            transport = session.unwrap_rsa_oaep(job.import_key_label, job.wrapped_transport_key,
                                                oaep_hash=job.oaep_hash)
            _Worker.transports[token] = transport
            while len(_Worker.transports) > _TRANSPORT_CACHE:
                session.destroy(_Worker.transports.popitem(last=False)[1])
        return session.rewrap(transport, job.keys, job.kek_label)


def _worker_rewrap(job: RewrapJob) -> list[bytes | None]:
    assert _Worker.settings is not None
    return run_rewrap(_Worker.settings, job)


def forget_transport_keys(settings: Settings) -> None:
    """Destroy this process's cached transport keys (at the end of a batch)."""
    from lifecycle.hsm import Hsm

    if not _Worker.transports:
        return
    with Hsm.open(settings).session() as session:
        while _Worker.transports:
            session.destroy(_Worker.transports.popitem()[1])


class HsmWorkers:
    """A pool of N spawned HSM worker processes; with N == 0 the work runs in this process.

    A worker that dies (killed, crashed module) breaks the pool: the job in flight fails with
    ``TransientHsmError`` and the next submission starts a fresh pool, so a retry succeeds.
    """

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = self._start() if workers > 0 else None
        self._owner: weakref.WeakKeyDictionary[Future[Any], ProcessPoolExecutor] = \
            weakref.WeakKeyDictionary()

    def _start(self) -> ProcessPoolExecutor:
        fields = self.settings.model_dump(exclude={"pin", "so_pin"})
        # SoftHSM2 2.6.1 never frees a destroyed session object (SoftHSMv2 issues 562 and 563:
        # the memory returns only at C_Finalize), about 120 bytes a key here. A worker is
        # therefore replaced after a bounded number of jobs, which keeps memory flat.
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(fields,),
            max_tasks_per_child=self.settings.worker_recycle_jobs)

    def rewrap(self, job: RewrapJob) -> Future[list[bytes | None]]:
        """Submit a re-wrap job; its future fails with ``TransientHsmError`` if a worker dies."""
        if self.workers == 0:
            done: Future[list[bytes | None]] = Future()
            try:
                done.set_result(run_rewrap(self.settings, job))
            except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
                done.set_exception(exc)
            return done
        with self._lock:
            if self._pool is None:
                self._pool = self._start()
            try:
                future = self._pool.submit(_worker_rewrap, job)
            except BrokenProcessPool:
                self._replace(self._pool)
                assert self._pool is not None
                future = self._pool.submit(_worker_rewrap, job)
            self._owner[future] = self._pool
            return future

    def result(self, future: Future[list[bytes | None]]) -> list[bytes | None]:
        """Wait for a job, translating a dead worker into a transient error.

        Raises:
            TransientHsmError: a worker process died (the pool is replaced for the retry).
            HsmError: the job failed in the HSM.
        """
        try:
            return future.result()
        except (BrokenProcessPool, CancelledError):
            with self._lock:
                self._replace(self._owner.get(future))
            raise TransientHsmError("re-wrap", "an HSM worker process died") from None

    def _replace(self, broken: ProcessPoolExecutor | None) -> None:
        # Only the pool that broke is replaced: several jobs of it fail at once, and the first
        # to notice must not take a fresh pool (and its jobs) down with it.
        if broken is None or broken is not self._pool:
            return
        broken.shutdown(wait=False, cancel_futures=True)
        self._pool = self._start()

    def close(self) -> None:
        """Stop the workers; their sessions, and the transport keys in them, end with them."""
        if self.workers == 0:
            forget_transport_keys(self.settings)
            return
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> HsmWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
