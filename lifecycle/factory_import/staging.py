"""The private staging folder: a delivery is copied in, hashed there, and read only from there.

A delivery's data file and manifest usually lie in a directory that others can write (an SFTP
drop, a share). Whatever is verified must be what is imported: so the two files are copied,
once, into ``<home>/staging/<delivery>/`` (mode 0700, files 0600, owned by this process's user)
and every later step (checksum, record count, transport-key probe, chunks) reads the copies.
Swapping the original after verification changes nothing. The copy is hashed while it is
written and again, by the checksum step, from the staged bytes.

The folder of a delivery is named after the SHA-256 of both files, so a re-run of an
interrupted import finds its staged copy; it is reused only when its bytes still hash to that
name, otherwise it is replaced. It is removed when the batch completes or is rejected.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lifecycle.errors import BatchError
from lifecycle.factory_import.batch_format import MAX_MANIFEST_BYTES, manifest_path

_BLOCK = 1 << 20


@dataclass(frozen=True)
class Staged:
    """A staged delivery: the private copies of its data file and manifest."""

    folder: Path
    data_file: Path
    file_sha256: str
    manifest_sha256: str


def staging_root(home: Path) -> Path:
    """Return the staging folder of a meterkeys home, created private (0700) if absent.

    Raises:
        BatchError: the folder exists but others may write to it (or it is not a folder).
    """
    root = home / "staging"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = root.lstat()
    if not root.is_dir() or root.is_symlink() or info.st_uid != os.getuid() or \
            info.st_mode & 0o077:
        raise BatchError(str(root), "staging folder is not a private folder of this user "
                                    "(expected mode 0700, owned by the importing user)")
    return root


def stage(home: Path, data_file: Path) -> Staged:
    """Copy a delivery (data file and manifest) into its private staging folder.

    The manifest is copied up to one byte past its size limit (the checks of the manifest
    then refuse it); a missing manifest stays missing in the staged folder.

    Raises:
        BatchError: the data file does not exist or cannot be read.
    """
    if not data_file.is_file():
        raise BatchError(data_file.name, "file does not exist")
    root = staging_root(home)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
    try:
        data = incoming / data_file.name
        file_sha = _copy(data_file, data, None)
        source_manifest = manifest_path(data_file)
        manifest_sha = ""
        if source_manifest.is_file():
            manifest_sha = _copy(source_manifest, manifest_path(data), MAX_MANIFEST_BYTES + 1)
        folder = root / f"{file_sha[:32]}-{(manifest_sha or 'none')[:32]}"
        if folder.exists() and _still_intact(folder, data.name, file_sha, manifest_sha):
            shutil.rmtree(incoming)
        else:
            remove(folder)
            os.rename(incoming, folder)
    except OSError as exc:
        shutil.rmtree(incoming, ignore_errors=True)
        raise BatchError(data_file.name, f"cannot stage the delivery ({exc.strerror})") from None
    return Staged(folder, folder / data_file.name, file_sha, manifest_sha)


def remove(folder: Path) -> None:
    """Remove a staged delivery (no error if it is gone already)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)


def _copy(source: Path, target: Path, limit: int | None) -> str:
    digest = hashlib.sha256()
    left = limit if limit is not None else -1
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with source.open("rb") as src, os.fdopen(fd, "wb") as dst:
        while left != 0:
            block = src.read(_BLOCK if left < 0 else min(_BLOCK, left))
            if not block:
                break
            digest.update(block)
            dst.write(block)
            left = left - len(block) if left > 0 else left
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _still_intact(folder: Path, name: str, file_sha: str, manifest_sha: str) -> bool:
    data = folder / name
    manifest = manifest_path(data)
    if not data.is_file() or manifest.is_file() != bool(manifest_sha):
        return False
    return _sha256(data) == file_sha and (not manifest_sha or _sha256(manifest) == manifest_sha)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
