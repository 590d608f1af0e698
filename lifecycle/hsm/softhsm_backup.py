"""Backup and restore of the embedded SoftHSM2 token.

Backup and restore hold the token lock exclusively (``lifecycle.hsm.token_lock``), so they never
copy or replace a token that a process may be writing.

A restored token must hold the storage KEK that wrapped the inventory's key blobs, or every meter
key becomes unusable (a bricked fleet). So a restore is first staged in a temporary token
directory and opened in a *spawned* child (this process may already have the module loaded with
the current token; reference pkcs11.md §3), which unwraps the caller's canary and sample blobs,
destroying each session key at once: no key leaves the HSM. Only then is the staged directory
swapped in. The blobs come from the caller (the installation steps read them from the
inventory): this package knows nothing of the database.

Backups never contain PIN files.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.errors import BackupError, ConfigError, HsmError, MeterkeysError
from lifecycle.hsm.connection import Hsm, close_all
from lifecycle.hsm.provision import softhsm_conf_text, write_private, write_softhsm_conf
from lifecycle.hsm.token_lock import LOCK_NAME, hold_token_lock

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CONF_NAME = "softhsm2.conf"
TOKENS_NAME = "tokens"
CHECK_TIMEOUT_SECONDS = 120.0


# --- backup ---------------------------------------------------------------------------------------
def backup(settings: Settings, canary: bytes, dest: Path, *, timeout: float = 10.0,
           now: datetime | None = None) -> Path:
    """Copy the token directory and its configuration into ``dest/<UTC timestamp>/``.

    The copy is taken under the exclusive token lock and carries a manifest with the SHA-256 of
    every file, the token label, the storage KEK label and the digest of the storage KEK's
    canary blob (``canary``), by which a later restore is verified. PIN files are never copied.

    Raises:
        ConfigError: not an embedded SoftHSM2 token, or no token directory.
        TokenBusy: a process holds the token open.
    """
    token_dir = _softhsm_token_dir(settings)
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
        "kek_check_sha256": hashlib.sha256(canary).hexdigest(),
        "files": dict(sorted(files.items())),
    }
    write_private(partial / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
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
    return (now or utcnow()).astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")


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
    write_private(dst, data)
    return hashlib.sha256(data).hexdigest()


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


def restore(settings: Settings, blobs: tuple[bytes, ...], src: Path, *, timeout: float = 10.0,
            now: datetime | None = None) -> RestoreReport:
    """Verify a backup, prove it holds the inventory's storage KEK, then swap it in.

    ``blobs`` are the storage KEK's canary followed by sample key blobs from the inventory. The
    backup's checksums are checked, the token is staged in a temporary directory and opened in a
    spawned child that unwraps each of ``blobs``. Only if that
    passes, the current token directory is renamed to ``<token_dir>.replaced-<ts>`` and the staged
    one takes its place, all under the exclusive token lock. Otherwise the current token is left
    untouched.

    Raises:
        BackupError: bad manifest or checksum, labels differ, no blobs, or the known-answer
            check failed.
        TokenBusy: a process holds the token open.
        ConfigError: not an embedded SoftHSM2 token.
    """
    if not settings.is_softhsm:
        raise ConfigError("restore covers the embedded SoftHSM2 token only")
    src = src.expanduser().resolve()
    manifest = _verified_manifest(src, settings)
    if not blobs:
        raise BackupError(src, "no canary blob of the storage KEK: cannot prove the backup "
                               "holds it")
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
        write_private(target, data)
    write_private(staging / CONF_NAME, softhsm_conf_text(tokens).encode())


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

    Returns (passed, reason): a failed check is a verdict to report, not an error of the child.
    """
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


__all__ = ["RestoreReport", "backup", "restore"]
