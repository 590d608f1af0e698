"""The HSM layer under concurrency: threads of one process are serialised by ``_CALL_LOCK``
(SoftHSM2 runs without its own locking, reference pkcs11.md §1), spawned processes each load and
log in themselves (§3). Nothing may fail, crash or damage the token."""

from __future__ import annotations

import hashlib
import multiprocessing
import secrets
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from pkcs11 import Attribute, KeyType, ObjectClass

from lifecycle.config import Settings
from lifecycle.hsm import boundary
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import HsmSession, SessionKey

THREADS = 8
PROCESSES = 2
ROUNDS = 400  # per worker; each round is about a dozen PKCS#11 operations
IV = bytes(12)
AAD = b"\x30" + bytes(16)
MAC_LABEL = "meterkeys-blob-mac"  # the default of Settings.blob_mac_label


def _transport(s: HsmSession, value: bytes) -> SessionKey:
    """A session key of known value that may only unwrap, standing in for a transport key."""
    with boundary.CALL_LOCK:
        obj = s._session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False, Attribute.VALUE: value, Attribute.UNWRAP: True})
    return SessionKey(obj, len(value) * 8)


def _round(s: HsmSession, kek: str, signer: str, n: int) -> None:
    """One round of every operation kind: generate, wrap, unwrap, rewrap, MAC, sign, GCM."""
    with s.scoped(s.generate_session_aes(128)) as key:
        blob = s.wrap_aes(kek, key)
    with s.scoped(s.unwrap_aes(kek, blob)) as first:
        sealed = s.gcm_encrypt(first, IV, AAD, n.to_bytes(8, "big"))
    with s.scoped(s.unwrap_aes(kek, blob)) as again:
        if s.gcm_decrypt(again, IV, AAD, sealed) != n.to_bytes(8, "big"):
            raise AssertionError("GCM round trip through a re-unwrapped key differs")
    value = secrets.token_bytes(32)
    with s.scoped(_transport(s, value)) as transport:
        (moved,) = s.rewrap(transport, [aes_key_wrap(value, bytes(16))], [kek])
    if moved is None:
        raise AssertionError("rewrap lost a key")
    s.destroy(s.unwrap_aes(kek, moved))
    if not all(s.verify_mac(MAC_LABEL, [moved], s.mac(MAC_LABEL, [moved]))):
        raise AssertionError("MAC does not verify")
    s.sign_ecdsa(signer, hashlib.sha256(n.to_bytes(8, "big")).digest())


def _work(rounds: int) -> int:
    from lifecycle.config import load_settings

    settings = load_settings()
    hsm = Hsm.open(settings)
    done = 0
    for n in range(rounds):
        with hsm.session() as s:
            _round(s, settings.storage_kek_label, settings.audit_key_label, n)
        done += 1
    return done


def _process_worker(rounds: int) -> tuple[int, str]:
    """Child side: open the HSM from the environment (METERKEYS_HOME), report, never raise."""
    try:
        return _work(rounds), ""
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        return -1, f"{type(exc).__name__}: {exc}"


def _fresh_process_check() -> dict[str, bool]:
    from lifecycle.config import load_settings

    settings = load_settings()
    return Hsm.open(settings).has_token_keys(settings.storage_kek_label, settings.audit_key_label)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_threads_and_processes_hammer_one_token(hsm: Hsm, settings: Settings) -> None:
    context = multiprocessing.get_context("spawn")
    errors: list[str] = []
    done: list[int] = []
    start = threading.Barrier(THREADS)

    def thread_worker() -> None:
        try:
            start.wait()
            done.append(_work(ROUNDS))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(f"{type(exc).__name__}: {exc}")

    with ProcessPoolExecutor(PROCESSES, mp_context=context) as pool:
        futures = [pool.submit(_process_worker, ROUNDS) for _ in range(PROCESSES)]
        threads = [threading.Thread(target=thread_worker) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=50)
        children = [f.result(timeout=50) for f in futures]

    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert done == [ROUNDS] * THREADS
    assert children == [(ROUNDS, "")] * PROCESSES

    with ProcessPoolExecutor(1, mp_context=context) as pool:
        present = pool.submit(_fresh_process_check).result(timeout=50)
    assert present == {settings.storage_kek_label: True, settings.audit_key_label: True}


# --- the call lock is held during every PKCS#11 call ---------------------------------------------
class _Observed:
    """Delegate to a python-pkcs11 object, recording for each call whether ``_CALL_LOCK`` was
    held by the calling thread and free for no other thread."""

    def __init__(self, target: Any, log: list[tuple[str, bool]]) -> None:
        self._target = target
        self._log = log

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._record(name)
            result = attr(*[_unwrapped(a) for a in args],
                          **{k: _unwrapped(v) for k, v in kwargs.items()})
            if hasattr(result, "__next__"):  # get_objects: a search iterator of objects
                return [_Observed(obj, self._log) for obj in result]
            return _Observed(result, self._log) if _is_pkcs11_object(result) else result

        return call

    def __getitem__(self, key: Any) -> Any:
        self._record(f"[{key}]")
        return self._target[key]

    def _record(self, name: str) -> None:
        lock = boundary.CALL_LOCK
        owned = bool(lock._is_owned())  # type: ignore[attr-defined]
        grabbed: list[bool] = []
        other = threading.Thread(target=lambda: grabbed.append(_try_take(lock)))
        other.start()
        other.join()
        self._log.append((name, owned and grabbed == [False]))


def _try_take(lock: Any) -> bool:
    if lock.acquire(blocking=False):
        lock.release()
        return True
    return False


def _unwrapped(value: Any) -> Any:
    return value._target if isinstance(value, _Observed) else value


def _is_pkcs11_object(value: Any) -> bool:
    return isinstance(value, pkcs11.Object | pkcs11.DomainParameters)


def test_call_lock_is_held_during_every_pkcs11_call(hsm: Hsm, settings: Settings) -> None:
    log: list[tuple[str, bool]] = []
    with hsm.session() as pooled:
        observed = HsmSession(_Observed(pooled._session, log), settings)
        _round(observed, settings.storage_kek_label, settings.audit_key_label, 1)
        observed.public_key_pem(settings.audit_key_label)
    names = {name for name, _ in log}
    assert {"get_key", "generate_key", "wrap_key", "unwrap_key", "sign", "encrypt",
            "decrypt", "destroy"} <= names
    unguarded = [name for name, guarded in log if not guarded]
    assert unguarded == []


# --- a token file unreadable for an instant ------------------------------------------------------
def _open_when_told(ready: Any, go: Any, opened: Any) -> None:
    """Child side: say it is ready, wait for the parent's signal, then load the module and log
    in."""
    from lifecycle.config import load_settings

    settings = load_settings()
    ready.set()
    go.wait(timeout=30)
    try:
        Hsm.open(settings)
        opened.put("")
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        opened.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.timeout(60)
def test_a_process_loading_while_the_token_file_is_unreadable_gets_in(
        hsm: Hsm, settings: Settings) -> None:
    # Another process rewriting the token's files can leave them unreadable for an instant
    # (SoftHSM2 then lists no token, or fails with GeneralError): a worker that loads the module
    # just then must try again, not fail its whole run. The instant is made here by moving each
    # token.object away for 0.2 s while a fresh process loads the module.
    context = multiprocessing.get_context("spawn")
    ready, go, opened = context.Event(), context.Event(), context.Queue()
    child = context.Process(target=_open_when_told, args=(ready, go, opened))
    child.start()
    try:
        assert ready.wait(timeout=30)
        files = sorted(settings.token_dir.glob("*/token.object"))
        assert files
        for path in files:
            path.rename(path.with_name("token.object.away"))
        try:
            go.set()
            time.sleep(0.2)
        finally:
            for path in files:
                path.with_name("token.object.away").rename(path)
        assert opened.get(timeout=30) == ""
    finally:
        child.join(timeout=30)
