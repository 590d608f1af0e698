"""Backup and restore of the embedded SoftHSM2 token, and the storage KEK canary.

Consistency rests on one lock file per token directory, ``<token_dir>/.meterkeys.lock``
(``fcntl.flock``): every process that has the token open holds it *shared* for its whole life
(``Hsm._connect``); backup and restore hold it *exclusive*, so they never copy or replace a token
that a process may be writing.

A restored token must hold the storage KEK that wrapped the inventory's key blobs, or every meter
key becomes unusable (a bricked fleet). So a restore is first staged in a temporary token
directory and opened in a *spawned* child (this process may already have the module loaded with
the current token; reference pkcs11.md §3), which unwraps the inventory's ``kek_check`` canary and
a few key blobs, destroying each session key at once: no key leaves the HSM. Only then is the
staged directory swapped in.

This module never imports pkcs11: HSM work runs through ``lifecycle.hsm`` in the child.
Backups never contain PIN files.

Errors (both under ``MeterkeysError``):

    ConfigError
    └── TokenBusy       the token lock was not obtained in time (a process holds the token open)
    BackupError         a backup is unusable or a restore was refused (names file or check)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from sqlalchemy import Engine

from lifecycle.config import Settings
from lifecycle.errors import ConfigError, HsmError, MeterkeysError
from lifecycle.inventory import get_kek_check, put_kek_check, sample_blobs, transaction

LOCK_NAME = ".meterkeys.lock"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CONF_NAME = "softhsm2.conf"
TOKENS_NAME = "tokens"
SAMPLE_BLOBS = 8
CANARY_BITS = 128
LOCK_POLL_SECONDS = 0.05
# How long Hsm.open waits for a running backup or restore (the token is small: seconds).
SHARED_LOCK_TIMEOUT = 60.0
CHECK_TIMEOUT_SECONDS = 120.0


class TokenBusy(ConfigError):
    """The token lock was not obtained in time: some process holds the token open."""

    def __init__(self, token_dir: Path, exclusive: bool, timeout: float) -> None:
        self.token_dir = token_dir
        what = ("a process holds the token open (stop workers, flows and CLI sessions using it)"
                if exclusive else "a backup or restore of the token is running")
        super().__init__(f"token directory {token_dir} is locked: {what}; "
                         f"gave up after {timeout:g} s")


class BackupError(MeterkeysError):
    """A backup is unusable, or a restore was refused; names the file or the failed check."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# --- the token lock -------------------------------------------------------------------------------
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


# --- the storage KEK canary -----------------------------------------------------------------------
def ensure_kek_check(settings: Settings, engine: Engine) -> bool:
    """Store a canary blob for the storage KEK unless the inventory has one; return if created.

    The canary is a random AES key generated in the HSM, wrapped under the storage KEK
    (RFC 3394) and destroyed; only the wrapped blob is stored.

    Raises:
        HsmError: the HSM could not generate or wrap the canary.
    """
    from lifecycle.hsm import Hsm

    label = settings.storage_kek_label
    with transaction(engine) as db:
        if get_kek_check(db, label) is not None:
            return False
    with Hsm.open(settings).session() as s, s.scoped(s.generate_session_aes(CANARY_BITS)) as key:
        blob = s.wrap_aes(label, key)
    with transaction(engine) as db:
        put_kek_check(db, label, blob)
    return True


# --- backup ---------------------------------------------------------------------------------------
def backup(settings: Settings, engine: Engine, dest: Path, *, timeout: float = 10.0,
           now: datetime | None = None) -> Path:
    """Copy the token directory and its configuration into ``dest/<UTC timestamp>/``.

    The copy is taken under the exclusive token lock and carries a manifest with the SHA-256 of
    every file, the token label and the storage KEK label. PIN files are never copied. The
    inventory must hold the storage KEK canary, or a later restore could not be verified.

    Raises:
        ConfigError: not an embedded SoftHSM2 token, or no token directory.
        TokenBusy: a process holds the token open.
        BackupError: the inventory has no canary for the storage KEK.
    """
    token_dir = _softhsm_token_dir(settings)
    with transaction(engine) as db:
        canary = get_kek_check(db, settings.storage_kek_label)
    if canary is None:
        raise BackupError(token_dir, f"the inventory has no kek_check canary for "
                                     f"{settings.storage_kek_label!r}: run meterkeys hsm init")
    stamp = _stamp(now)
    dest = dest.expanduser().resolve()
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = dest / stamp
    partial = dest / f".{stamp}.partial"
    with hold_token_lock(settings, exclusive=True, timeout=timeout):
        partial.mkdir(mode=0o700)
        try:
            files = _copy_tree(token_dir, partial / TOKENS_NAME, settings)
            if settings.softhsm_conf_path.exists():
                files[CONF_NAME] = _copy_file(settings.softhsm_conf_path, partial / CONF_NAME)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": stamp,
        "token_label": settings.token_label,
        "storage_kek_label": settings.storage_kek_label,
        "kek_check_sha256": hashlib.sha256(bytes(canary.blob)).hexdigest(),
        "files": dict(sorted(files.items())),
    }
    _write_private(partial / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    partial.rename(final)
    return final


def _softhsm_token_dir(settings: Settings) -> Path:
    if not settings.is_softhsm:
        raise ConfigError("backup and restore cover the embedded SoftHSM2 token only; "
                          "back up a network HSM with its vendor's procedure")
    token_dir = settings.token_dir
    if not token_dir.is_dir():
        raise ConfigError(f"no token directory {token_dir}: run meterkeys hsm init")
    return token_dir


def _stamp(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _copy_tree(src: Path, dst: Path, settings: Settings) -> dict[str, str]:
    """Copy a token directory; return {relative path: sha256} of what was copied."""
    secrets = settings.secrets_dir.resolve()
    files: dict[str, str] = {}
    dst.mkdir(mode=0o700)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.name == LOCK_NAME or _is_pin_file(path, secrets):
            continue
        if path.is_symlink():
            raise BackupError(path, "symbolic link in the token directory; refusing to follow it")
        if path.is_dir():
            (dst / rel).mkdir(mode=0o700)
        else:
            files[f"{TOKENS_NAME}/{rel.as_posix()}"] = _copy_file(path, dst / rel)
    return files


def _is_pin_file(path: Path, secrets: Path) -> bool:
    return path.suffix == ".pin" or path.resolve().is_relative_to(secrets)


def _copy_file(src: Path, dst: Path) -> str:
    data = src.read_bytes()
    _write_private(dst, data)
    return hashlib.sha256(data).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# --- restore --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestoreReport:
    """What a restore did: where the previous token went and how many blobs were checked."""

    token_dir: Path
    replaced: Path | None
    checked_blobs: int


@dataclass(frozen=True)
class _CheckRequest:
    """What the child needs to open the staged token: paths and labels, never a secret."""

    home: Path
    pin_file: Path | None
    module: Path
    token_label: str
    kek_label: str
    blobs: tuple[bytes, ...]


def restore(settings: Settings, engine: Engine, src: Path, *, timeout: float = 10.0,
            now: datetime | None = None) -> RestoreReport:
    """Verify a backup, prove it holds the inventory's storage KEK, then swap it in.

    The backup's checksums are checked, the token is staged in a temporary directory and opened
    in a spawned child that unwraps the ``kek_check`` canary and up to 8 key blobs. Only if that
    passes, the current token directory is renamed to ``<token_dir>.replaced-<ts>`` and the staged
    one takes its place, all under the exclusive token lock. Otherwise the current token is left
    untouched.

    Raises:
        BackupError: bad manifest or checksum, labels differ, no canary, or the known-answer
            check failed.
        TokenBusy: a process holds the token open.
        ConfigError: not an embedded SoftHSM2 token.
    """
    if not settings.is_softhsm:
        raise ConfigError("restore covers the embedded SoftHSM2 token only")
    src = src.expanduser().resolve()
    manifest = _verified_manifest(src, settings)
    blobs = _check_blobs(settings, engine)
    stamp = _stamp(now)
    token_dir = settings.token_dir
    staging = settings.home_dir / f".restore-{stamp}"
    with hold_token_lock(settings, exclusive=True, timeout=timeout):
        try:
            _stage(src, manifest, staging)
            _known_answer_check(settings, staging, blobs, src)
            replaced = _swap(token_dir, staging / TOKENS_NAME, stamp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not settings.softhsm_conf_path.exists():
        from lifecycle.hsm_token import write_softhsm_conf

        write_softhsm_conf(settings)
    return RestoreReport(token_dir, replaced, len(blobs))


def _verified_manifest(src: Path, settings: Settings) -> dict[str, object]:
    path = src / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(path, "no manifest: not a meterkeys token backup") from None
    except (OSError, ValueError) as exc:
        raise BackupError(path, f"unreadable manifest ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BackupError(path, "unknown manifest format")
    for field, expected in (("token_label", settings.token_label),
                            ("storage_kek_label", settings.storage_kek_label)):
        if manifest.get(field) != expected:
            raise BackupError(path, f"{field} is {manifest.get(field)!r}, "
                                    f"this installation uses {expected!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not any(k.startswith(f"{TOKENS_NAME}/") for k in files):
        raise BackupError(path, "manifest lists no token files")
    _check_files(src, files)
    return manifest


def _check_files(src: Path, files: dict[str, str]) -> None:
    for rel, digest in files.items():
        path = (src / rel).resolve()
        if not path.is_relative_to(src) or not path.is_file():
            raise BackupError(src / rel, "file listed in the manifest is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise BackupError(path, "SHA-256 differs from the manifest: backup is corrupted")
    present = {p.relative_to(src).as_posix() for p in (src / TOKENS_NAME).rglob("*")
               if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(files))
    if extra:
        raise BackupError(src / extra[0], "file not listed in the manifest")


def _check_blobs(settings: Settings, engine: Engine) -> tuple[bytes, ...]:
    label = settings.storage_kek_label
    with transaction(engine) as db:
        canary = get_kek_check(db, label)
        samples = sample_blobs(db, label, SAMPLE_BLOBS)
    if canary is None:
        raise BackupError(settings.token_dir, f"the inventory has no kek_check canary for "
                                              f"{label!r}: cannot prove the backup holds it")
    return (bytes(canary.blob), *samples)


def _stage(src: Path, manifest: dict[str, object], staging: Path) -> None:
    staging.mkdir(mode=0o700)
    tokens = staging / TOKENS_NAME
    tokens.mkdir(mode=0o700)
    files = manifest["files"]
    assert isinstance(files, dict)
    for rel in sorted(files):
        if not rel.startswith(f"{TOKENS_NAME}/"):
            continue
        target = staging / rel
        for parent in reversed(target.relative_to(staging).parents[:-1]):
            (staging / parent).mkdir(mode=0o700, exist_ok=True)
        data = (src / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != files[rel]:
            raise BackupError(src / rel, "SHA-256 differs from the manifest: backup is corrupted")
        _write_private(target, data)
    conf = (f"directories.tokendir = {tokens}\n"
            "objectstore.backend = file\n"
            "objectstore.umask = 0077\n"
            "log.level = ERROR\n"
            "slots.removable = false\n")
    _write_private(staging / CONF_NAME, conf.encode())


def _known_answer_check(settings: Settings, staging: Path, blobs: tuple[bytes, ...],
                        src: Path) -> None:
    request = _CheckRequest(
        home=staging,
        pin_file=settings.pin_file or (None if settings.pin else settings.secrets_dir / "user.pin"),
        module=settings.module_path,
        token_label=settings.token_label,
        kek_label=settings.storage_kek_label,
        blobs=blobs,
    )
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            ok, reason = pool.submit(_check_in_child, request).result(CHECK_TIMEOUT_SECONDS)
    except BrokenProcessPool:
        ok, reason = False, "the checking process died"
    except TimeoutError:
        ok, reason = False, f"the check took longer than {CHECK_TIMEOUT_SECONDS:g} s"
    if not ok:
        raise BackupError(src, f"refused: the backed-up token fails the storage KEK "
                               f"known-answer check ({reason}); current token left untouched")


def _check_in_child(request: _CheckRequest) -> tuple[bool, str]:
    """Child side: open the staged token, unwrap each blob under the storage KEK and destroy it.

    Returns (passed, reason) rather than raising: the project's errors do not survive pickling.
    """
    from lifecycle.hsm import Hsm, close_all

    overrides: dict[str, object] = {
        "home": request.home, "pkcs11_module": request.module,
        "token_label": request.token_label, "storage_kek_label": request.kek_label,
        "softhsm2_conf": request.home / CONF_NAME}
    if request.pin_file is not None:
        overrides["pin_file"] = request.pin_file
    try:
        staged = Settings(**overrides)  # type: ignore[arg-type]
        with Hsm.open(staged).session() as s:
            if not s.has_key(request.kek_label):
                return False, f"no storage KEK labelled {request.kek_label!r}"
            for index, blob in enumerate(request.blobs):
                try:
                    s.destroy(s.unwrap_aes(request.kek_label, blob))
                except HsmError as exc:
                    what = "canary" if index == 0 else f"key blob sample {index}"
                    return False, f"{what} does not unwrap: {exc.cause}"
        return True, f"{len(request.blobs)} blobs unwrap"
    except MeterkeysError as exc:
        return False, str(exc)
    finally:
        close_all()


def _swap(token_dir: Path, staged: Path, stamp: str) -> Path | None:
    replaced: Path | None = None
    if token_dir.exists():
        replaced = token_dir.with_name(f"{token_dir.name}.replaced-{stamp}")
        token_dir.rename(replaced)
    try:
        staged.rename(token_dir)
    except OSError:
        if replaced is not None:
            replaced.rename(token_dir)
        raise
    return replaced


__all__ = ["SHARED_LOCK_TIMEOUT", "BackupError", "RestoreReport", "TokenBusy", "TokenLock",
           "backup", "ensure_kek_check", "hold_token_lock", "restore"]
