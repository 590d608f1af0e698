"""The token directory lock of the embedded SoftHSM2 token.

One lock file per token directory, ``<token_dir>/.meterkeys.lock`` (``fcntl.flock``): every
process that has the token open holds it *shared* for its whole life (``Hsm._connect``); backup
and restore hold it *exclusive*, so they never copy or replace a token that a process may be
writing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from lifecycle.config import Settings
from lifecycle.errors import ConfigError, TokenBusy

LOCK_NAME = ".meterkeys.lock"
LOCK_POLL_SECONDS = 0.05
# How long Hsm.open waits for a running backup or restore (the token is small: seconds).
SHARED_LOCK_TIMEOUT = 60.0


class TokenLock:
    """A held ``flock`` on a token directory's lock file; release it or use it as a context."""

    def __init__(self, path: Path, fd: int, exclusive: bool) -> None:
        self.path = path
        self.exclusive = exclusive
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock; releasing twice is harmless."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _PROCESS_LOCKS.pop(self.path, None)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> TokenLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


# Shared locks live as long as the process (its HSM connection does); keep them referenced here.
_PROCESS_LOCKS: dict[Path, TokenLock] = {}


def release_shared_locks() -> None:
    """Release this process's shared token locks (after its HSM connection is closed)."""
    for lock in list(_PROCESS_LOCKS.values()):
        lock.release()


def hold_token_lock(settings: Settings, exclusive: bool, timeout: float) -> TokenLock:
    """Take the token directory's lock, shared or exclusive, waiting up to ``timeout`` seconds.

    A shared lock is kept for the life of the process (taking it again returns the same lock).
    The lock file lives inside the token directory; a lock whose file was renamed away while
    waiting (a restore swapped the directory) is dropped and taken again on the new file.

    Raises:
        TokenBusy: the lock was not obtained in time.
        ConfigError: the lock file cannot be opened.
    """
    token_dir = settings.token_dir
    path = token_dir / LOCK_NAME
    if not exclusive:
        held = _PROCESS_LOCKS.get(path)
        if held is not None and held.held:
            return held
    deadline = time.monotonic() + timeout
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    while True:
        fd = _open_lock_file(path)
        if _try_flock(fd, mode, deadline) and _same_file(fd, path):
            lock = TokenLock(path, fd, exclusive)
            if not exclusive:
                _PROCESS_LOCKS[path] = lock
            return lock
        os.close(fd)
        if time.monotonic() >= deadline:
            raise TokenBusy(token_dir, exclusive, timeout)


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open token lock file {path}: {exc.strerror}") from None


def _try_flock(fd: int, mode: int, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(LOCK_POLL_SECONDS)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
