"""Bulk HSM work on spawned workers: results match, and a killed worker costs a retry only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from lifecycle.errors import (
    ConfigError,
    IntegrityError,
    KeyNotFound,
    PermanentHsmError,
    TransientHsmError,
)
from lifecycle.factory_import.rewrap import RewrapJob, run_rewrap
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.hsm.session import ObjectClass, objects_made
from simulator.manufacturer import wrap_transport_key

LABEL = "test-pool-import"


@pytest.fixture(scope="module")
def transport(settings, hsm):  # type: ignore[no-untyped-def]
    """A transport key RSA-wrapped under a test import key, and keys wrapped under it."""
    with hsm.session() as s:
        if not s.has_key(LABEL, ObjectClass.PRIVATE_KEY):
            s.generate_token_rsa(LABEL, 2048)
        pem = s.public_key_pem(LABEL)
        oaep = s.probe_oaep_hash(LABEL, pem)
    key = os.urandom(32)
    return oaep, wrap_transport_key(key, pem.decode(), oaep), key


def _job(settings, transport, keys: list[bytes]) -> RewrapJob:  # type: ignore[no-untyped-def]
    oaep, wrapped, _ = transport
    return RewrapJob(LABEL, oaep, wrapped, keys)


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "multiprocessing" in " ".join(p.cmdline()) and "resource_tracker"
            not in " ".join(p.cmdline())]


def _kill_the_workers_at_work() -> None:
    deadline = time.monotonic() + 30
    while not _workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well into the job
    for worker in _workers():
        os.kill(worker.pid, signal.SIGKILL)


def test_workers_rewrap_like_the_process_itself(settings, hsm, transport) -> None:  # type: ignore[no-untyped-def]
    tk = transport[2]
    keys = [aes_key_wrap(tk, os.urandom(16)) for _ in range(200)]
    keys[7] = keys[7][:-1] + bytes([keys[7][-1] ^ 1])
    with HsmWorkers(settings, 2) as pool:
        blobs = pool.result(pool.submit(run_rewrap, _job(settings, transport, keys)))
    assert [i for i, b in enumerate(blobs) if b is None] == [7]
    with hsm.session() as s:  # each blob unwraps under its storage KEK: the same key sealed
        for sealed in blobs[:4]:
            assert sealed is not None and len(sealed.blob) == 24
            s.destroy(s.unwrap_stored(sealed.kek_label, sealed.blob))


def test_a_killed_worker_fails_one_job_transiently_and_the_retry_succeeds(
        settings, transport) -> None:  # type: ignore[no-untyped-def]
    tk = transport[2]
    big = [aes_key_wrap(tk, os.urandom(16)) for _ in range(40_000)]
    with HsmWorkers(settings, 1) as pool:
        future = pool.submit(run_rewrap, _job(settings, transport, big))
        _kill_the_workers_at_work()
        with pytest.raises(TransientHsmError, match="worker process died"):
            pool.result(future)
        again = pool.result(pool.submit(run_rewrap, _job(settings, transport, big[:100])))
    assert len(again) == 100 and all(again)


def test_workers_are_replaced_after_a_bounded_number_of_session_objects(
        settings, transport) -> None:  # type: ignore[no-untyped-def]
    """Each job makes 51 session objects (the transport key and 50 keys in flight): with a
    bound of 100 objects a worker, the worker is replaced after every second job."""
    tk = transport[2]
    keys = [aes_key_wrap(tk, os.urandom(16)) for _ in range(50)]
    recycling = settings.model_copy(update={"worker_recycle_objects": 100})
    seen: list[set[int]] = []
    with HsmWorkers(recycling, 1) as pool:
        for _ in range(6):
            assert all(pool.result(pool.submit(run_rewrap, _job(recycling, transport, keys))))
            seen.append({p.pid for p in _workers()})
    assert len(set().union(*seen)) >= 3, seen
    assert seen[0] & seen[1], "the first two jobs ran on the same worker"


def test_jobs_that_make_no_session_objects_never_replace_the_workers(settings, hsm) -> None:  # type: ignore[no-untyped-def]
    """MACs (like signatures) with a token key leave nothing behind in SoftHSM2: however many
    such jobs run, with a bound of one object, the same worker goes on."""
    recycling = settings.model_copy(update={"worker_recycle_objects": 1})
    pids: set[int] = set()
    with HsmWorkers(recycling, 1) as pool:
        for _ in range(8):
            assert pool.result(pool.submit(_mac_job, 20)) == 0
            pids.update(p.pid for p in _workers())
    assert len(pids) == 1, pids


def test_session_objects_are_counted_where_they_are_made(settings, hsm) -> None:  # type: ignore[no-untyped-def]
    before = objects_made()
    with hsm.session() as s:
        s.destroy(s.generate_session_aes(128))
        blob = s.wrap_aes(settings.storage_kek_label, key := s.generate_session_aes(128))
        s.destroy(key)
        s.destroy(s.unwrap_stored(settings.storage_kek_label, blob))
        with pytest.raises(IntegrityError):  # a blob that does not unwrap makes nothing
            s.unwrap_stored(settings.storage_kek_label, blob[:-1] + bytes([blob[-1] ^ 1]))
    assert objects_made() - before == 3


def _mac_job(settings, count: int) -> int:  # type: ignore[no-untyped-def]
    """A worker job: ``count`` MACs with the token's MAC key; the session objects made so far."""
    with Hsm.open(settings).session() as s:
        s.mac(settings.blob_mac_label, [b"message"] * count)
    return objects_made()


def test_jobs_queued_beyond_the_workers_all_run_across_a_recycling(settings, transport) -> None:  # type: ignore[no-untyped-def]
    """Ten jobs submitted at once to one worker replaced every two jobs (six session objects
    each, a bound of twelve): all ten finish. With
    ``ProcessPoolExecutor(max_tasks_per_child=2)`` the pool ran two and then hung (CPython
    gh-115634), which stalled a claim whose chunks queue jobs ahead."""
    from concurrent.futures import wait

    tk = transport[2]
    keys = [aes_key_wrap(tk, os.urandom(16)) for _ in range(5)]
    recycling = settings.model_copy(update={"worker_recycle_objects": 12})  # 6 objects a job
    pool = HsmWorkers(recycling, 1)
    stuck: set[object] = {None}
    try:
        futures = [pool.submit(run_rewrap, _job(recycling, transport, keys)) for _ in range(10)]
        done, stuck = wait(futures, timeout=120)
        assert not stuck, f"{len(stuck)} of 10 jobs never ran"
        assert all(all(pool.result(f)) for f in done)
        stuck = set()
    finally:
        for worker in _workers() if stuck else []:  # a hung pool would hang the close below
            worker.kill()
        pool.close()


def test_workers_outlive_the_thread_that_started_them(settings, transport) -> None:  # type: ignore[no-untyped-def]
    """A worker is started by whichever thread makes or replaces the pool: a caller's, or the
    thread of the pool that calls back when a job ends (a replacement after a recycling). It must
    live on when that thread ends. With ``PR_SET_PDEATHSIG``, which Linux ties to the thread
    that started the process and not to the process, the worker got SIGTERM when that thread
    ended, and the next job failed with a broken pool (seen once in CI)."""
    tk = transport[2]
    keys = [aes_key_wrap(tk, os.urandom(16)) for _ in range(5)]
    made: list[HsmWorkers] = []
    first: list[bool] = []
    started: set[int] = set()

    def start() -> None:  # makes the pool (its workers start now) and runs a job
        made.append(HsmWorkers(settings, 1))
        first.extend(made[0].result(made[0].submit(run_rewrap, _job(settings, transport, keys))))
        started.update(p.pid for p in _workers())

    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    with made[0] as pool:
        assert first and all(first) and started
        time.sleep(1.0)  # the starting thread has ended: any signal tied to it has landed
        assert {p.pid for p in _workers()} == started  # the worker lives on
        assert all(pool.result(pool.submit(run_rewrap, _job(settings, transport, keys))))
        assert {p.pid for p in _workers()} == started  # and ran the next job itself


def test_a_worker_ends_when_its_parent_process_is_killed(settings) -> None:  # type: ignore[no-untyped-def]
    """A worker must not outlive its parent holding an HSM session: kill the parent with
    SIGKILL (nothing of it runs) and its worker is gone within a few seconds."""
    script = (
        "import sys, time\n"
        "from lifecycle.config import load_settings\n"
        "from lifecycle.hsm.pool import HsmWorkers\n"
        "from lifecycle.meter_keys.transfer import ProofJob, run_proof_checks\n"
        "if __name__ == '__main__':\n"
        "    pool = HsmWorkers(load_settings(), 1)\n"
        "    assert pool.result(pool.submit(run_proof_checks, ProofJob([]))) == []\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[3])
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        workers = [p for p in psutil.Process(parent.pid).children(recursive=True)
                   if "resource_tracker" not in " ".join(p.cmdline())]
        assert workers, "the parent started no worker"
        parent.kill()
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_permanent_error_in_a_worker_reaches_the_caller_as_itself(settings, transport) -> None:  # type: ignore[no-untyped-def]
    oaep, wrapped, _ = transport
    job = RewrapJob("no-such-import-key", oaep, wrapped, [b"\0" * 24])
    with HsmWorkers(settings, 1) as pool:
        with pytest.raises(KeyNotFound) as info:
            pool.result(pool.submit(run_rewrap, job))
        assert info.value.label == "no-such-import-key"
        # The pool is not broken: the next job runs on the same workers.
        assert len(pool.result(pool.submit(run_rewrap, _job(settings, transport, [])))) == 0


ATTEMPTS: list[int] = []


def test_a_permanent_error_in_a_worker_is_not_retried_by_prefect(
        settings, transport, prefect_server) -> None:  # type: ignore[no-untyped-def]
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from tasks.context import retry_on_transient

    oaep, wrapped, _ = transport
    job = RewrapJob("no-such-import-key", oaep, wrapped, [b"\0" * 24])

    @task(persist_result=False, cache_policy=NO_CACHE, retries=3, retry_delay_seconds=0,
          retry_condition_fn=retry_on_transient)
    def rewrap_on_workers() -> None:
        ATTEMPTS.append(1)
        with HsmWorkers(settings, 1) as pool:
            pool.result(pool.submit(run_rewrap, job))

    @flow(persist_result=False)
    def one_chunk() -> None:
        rewrap_on_workers()

    ATTEMPTS.clear()
    state = one_chunk(return_state=True)
    assert state.is_failed()
    with pytest.raises(KeyNotFound):
        state.result()
    assert len(ATTEMPTS) == 1


def test_a_closed_pool_starts_no_workers_again(settings, transport) -> None:  # type: ignore[no-untyped-def]
    # A task still running when its flow has ended (the claim makes the next chunk's keys while
    # it settles the current one) must fail for good, not bring the workers back.
    pool = HsmWorkers(settings, 1)
    pool.close()
    with pytest.raises(PermanentHsmError, match="workers are closed"):
        pool.submit(run_rewrap, _job(settings, transport, []))
    assert _workers() == []


def test_waiting_jobs_go_by_rank_then_in_order(settings, transport) -> None:  # type: ignore[no-untyped-def]
    # One worker, busy with the first job: the rest wait in the pool and go lowest rank first
    # (a claim's earlier chunk before the chunks made ahead); a plain executor runs them in
    # the order submitted.
    tk = transport[2]
    keys = [aes_key_wrap(tk, os.urandom(16)) for _ in range(300)]
    done: list[str] = []
    with HsmWorkers(settings, 1) as pool:
        futures = []
        for name, rank in (("first", 0), ("chunk-3", 3), ("chunk-2a", 2), ("chunk-2b", 2),
                           ("chunk-1", 1)):
            with pool.ranked(rank):
                future = pool.submit(run_rewrap, _job(settings, transport, keys))
            future.add_done_callback(lambda _, name=name: done.append(name))
            futures.append(future)
        assert all(all(pool.result(f)) for f in futures)
    assert done == ["first", "chunk-1", "chunk-2a", "chunk-2b", "chunk-3"]


def test_jobs_waiting_when_a_worker_dies_run_on_fresh_workers(settings, transport) -> None:  # type: ignore[no-untyped-def]
    tk = transport[2]
    big = [aes_key_wrap(tk, os.urandom(16)) for _ in range(40_000)]
    small = [aes_key_wrap(tk, os.urandom(16)) for _ in range(20)]
    with HsmWorkers(settings, 1) as pool:
        running = pool.submit(run_rewrap, _job(settings, transport, big))
        waiting = [pool.submit(run_rewrap, _job(settings, transport, small)) for _ in range(2)]
        _kill_the_workers_at_work()
        with pytest.raises(TransientHsmError, match="worker process died"):
            pool.result(running)
        assert all(len(pool.result(f)) == 20 for f in waiting)


def test_closing_cancels_the_jobs_still_waiting(settings, transport) -> None:  # type: ignore[no-untyped-def]
    tk = transport[2]
    keys = [aes_key_wrap(tk, os.urandom(16)) for _ in range(2000)]
    pool = HsmWorkers(settings, 1)
    first = pool.submit(run_rewrap, _job(settings, transport, keys))
    waiting = pool.submit(run_rewrap, _job(settings, transport, keys))
    pool.close()
    assert waiting.cancelled()
    with pytest.raises(TransientHsmError):
        pool.result(waiting)
    assert first.done()


def test_workers_start_and_load_the_module_when_the_pool_is_made(settings) -> None:  # type: ignore[no-untyped-def]
    # No job is handed to the pool: its workers still start, each loading the PKCS#11 module
    # (and logging in) by itself, so that the caller's first job does not wait for that.
    module = Path(settings.module_path).resolve()

    def loaded(worker: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return any(Path(m.path).resolve() == module for m in worker.memory_maps())
        return False

    with HsmWorkers(settings, 2):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and \
                not (len(_workers()) == 2 and all(loaded(w) for w in _workers())):
            time.sleep(0.05)
        assert len(_workers()) == 2
        assert all(loaded(w) for w in _workers())


def test_a_worker_that_cannot_log_in_reports_it_with_its_first_job(settings, tmp_path,
                                                                   transport) -> None:  # type: ignore[no-untyped-def]
    # The workers log in as they start; a login that fails there must not break the pool (a
    # broken pool reads as a dead worker, retried as transient): the first job meets the same
    # error and the caller gets it as it is.
    without_pin = settings.model_copy(update={"pin_file": tmp_path / "no-such.pin"})
    with HsmWorkers(without_pin, 1) as pool, pytest.raises(ConfigError, match="no user PIN"):
        pool.result(pool.submit(run_rewrap, _job(settings, transport, [])))
