"""The process's connection to the token: the module loaded and logged in once per process.

Process model (shared reference "pkcs11.md"):
- ``C_Login`` logs in every session of the application, so a process logs in once and opens
  further sessions without a PIN, from a pool (§2).
- State inherited through ``fork`` is refused: a child must load the module itself (``spawn``,
  §3). Bulk work scales by processes (``lifecycle.hsm.pool``), each with its own load and login.
- An embedded SoftHSM2 token is held under a *shared* token lock for the life of the process, so
  that backup and restore (exclusive) never copy or replace a token that it may be writing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pkcs11
from pkcs11 import ObjectClass
from pkcs11 import exceptions as px

from lifecycle.config import Settings
from lifecycle.errors import ConfigError, HsmError, PermanentHsmError
from lifecycle.hsm import native
from lifecycle.hsm.boundary import CALL_LOCK, translated
from lifecycle.hsm.session import HsmSession
from lifecycle.hsm.token_lock import SHARED_LOCK_TIMEOUT, hold_token_lock, release_shared_locks

_OPEN_LOCK = threading.Lock()
_INSTANCES: dict[tuple[str, str], Hsm] = {}


class Hsm:
    """The process's logged-in connection to one token, with a pool of sessions.

    Obtain it with ``Hsm.open(settings)``; every thread of the process shares it.
    """

    def __init__(self, settings: Settings, lib: Any, token: Any, login: Any) -> None:
        self.settings = settings
        self._lib = lib
        self._token = token
        self._login = login  # held open for the life of the process: login is per application
        self._idle: queue.LifoQueue[HsmSession] = queue.LifoQueue()
        self._idle.put(HsmSession(login, settings))
        self.pid = os.getpid()

    @classmethod
    def open(cls, settings: Settings) -> Hsm:
        """Return this process's HSM connection, loading the module and logging in once.

        Raises:
            ConfigError: no module, no token or no PIN configured.
            PermanentHsmError: wrong PIN, or module state inherited through fork.
        """
        module = str(settings.module_path)
        key = (module, settings.token_label)
        with _OPEN_LOCK:
            hsm = _INSTANCES.get(key)
            if hsm is not None:
                if hsm.pid != os.getpid():
                    raise PermanentHsmError(
                        "open", "HSM state inherited through fork; start workers with spawn")
                return hsm
            hsm = cls._connect(settings, module)
            _INSTANCES[key] = hsm
            return hsm

    @classmethod
    def _connect(cls, settings: Settings, module: str) -> Hsm:
        if settings.is_softhsm:
            conf = settings.softhsm_conf_path
            if not conf.exists():
                raise ConfigError(f"SoftHSM2 configuration {conf} is missing: "
                                  "run meterkeys hsm init")
            os.environ["SOFTHSM2_CONF"] = str(conf)
            hold_token_lock(settings, exclusive=False, timeout=SHARED_LOCK_TIMEOUT)
        pin = settings.user_pin()
        with translated("load module"):
            lib, token, login = _load(module, settings.token_label, pin)
        return cls(settings, lib, token, login)

    @contextlib.contextmanager
    def session(self) -> Iterator[HsmSession]:
        """Borrow a session from the pool; it returns to the pool on leaving.

        Raises:
            TransientHsmError: a new session could not be opened.
        """
        try:
            session = self._idle.get_nowait()
        except queue.Empty:
            with translated("open session"):
                session = HsmSession(
                    self._token.open(rw=True, attribute_mapper=native.attribute_mapper()),
                    self.settings)
        try:
            yield session
        finally:
            self._idle.put(session)

    @contextlib.contextmanager
    def raw_session(self) -> Iterator[Any]:
        """Open a separate python-pkcs11 session, closed on leaving (its objects end with it).

        For the protection probe (``lifecycle.hsm.check``), whose throw-away objects must not
        outlive it; the caller holds the call lock around its calls.

        Raises:
            TransientHsmError: the session could not be opened.
        """
        with translated("open session"):
            raw = self._token.open(rw=True, attribute_mapper=native.attribute_mapper())
        try:
            yield raw
        finally:
            with contextlib.suppress(HsmError), translated("close session"):
                raw.close()

    def mechanisms(self) -> set[int]:
        """Return the mechanisms the token's slot offers."""
        with translated("list mechanisms"):
            return {int(m) for m in self._token.slot.get_mechanisms()}

    def has_token_keys(self, *labels: str) -> dict[str, bool]:
        """Report which of the given secret or private token keys exist."""
        with self.session() as s:
            return {label: s.has_key(label) or s.has_key(label, ObjectClass.PRIVATE_KEY)
                    for label in labels}

    def close_sessions(self) -> None:
        """Close every idle session of this connection (at process exit)."""
        while not self._idle.empty():
            with contextlib.suppress(Exception):
                self._idle.get_nowait().close()


def close_all() -> None:
    """Close every session, finalise the module and release the token lock (exit and tests)."""
    with _OPEN_LOCK, CALL_LOCK:
        for hsm in _INSTANCES.values():
            hsm.close_sessions()
        for module, _label in list(_INSTANCES):
            with contextlib.suppress(Exception):
                pkcs11.unload(module)
        _INSTANCES.clear()
    release_shared_locks()


# SoftHSM2 reads its token files when the module loads and when a session logs in. Another
# process that logs in or writes token objects at that moment can leave them unreadable for an
# instant: the token is then missing from the slot list, or the call fails with GeneralError
# (seen once in a few hundred spawned workers under load). A few attempts, each on a freshly
# initialised module, ride that out; a wrong PIN or a token that stays missing still fails.
LOAD_ATTEMPTS = 5
LOAD_BACKOFF_SECONDS = 0.05


def _load(module: str, token_label: str, pin: str) -> tuple[Any, Any, Any]:
    """Load the module, find the token and log in; return (lib, token, logged-in session).

    Raises:
        ConfigError: no token with that label, after every attempt.
        pkcs11.exceptions.PKCS11Error: as the module reports it (translated by the caller).
    """
    lib = None
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        try:
            if lib is None:
                lib = pkcs11.lib(module)
            else:
                lib.reinitialize()  # C_Finalize + C_Initialize: the module reads the token again
            token = lib.get_token(token_label=token_label)
            login = token.open(rw=True, user_pin=pin, attribute_mapper=native.attribute_mapper())
            return lib, token, login
        except (px.NoSuchToken, px.GeneralError) as exc:
            if attempt == LOAD_ATTEMPTS:
                if isinstance(exc, px.NoSuchToken):
                    raise ConfigError(f"no token labelled {token_label!r}: run meterkeys hsm "
                                      "init") from None
                raise
            time.sleep(LOAD_BACKOFF_SECONDS * attempt)
    raise AssertionError("unreachable")


__all__ = ["Hsm", "close_all"]
