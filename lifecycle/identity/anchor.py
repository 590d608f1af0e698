"""The principals' trust anchor: a file outside the inventory naming the root security officer.

``principals.anchor`` lives in the audit witness's folder (``Settings.witness_path``: in
production, where the inventory's writers cannot write). JSON lines:

1. ``{"installation", "root", "root_fingerprint"}``: the first security officer, enrolled by
   ``hsm init`` with a request signed by its own key;
2. optionally ``{"second", "second_fingerprint"}``: the one security officer the root may
   enrol alone, so that dual control can start.

Every other principal is trusted only through enrolments two security officers signed, back to
these two (``lifecycle.identity.rules.verify_enrolment``). The file is created ``O_EXCL`` with
mode 0600, appended under an exclusive ``flock`` with fsync, and never rewritten; writing what
it already says is a no-op, so a command that failed after writing it can be run again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.config import ensure_private_dir
from lifecycle.errors import AuditError, ConfigError

FILE_NAME = "principals.anchor"
_FINGERPRINT = re.compile(r"sha256:[A-Za-z0-9_-]{43}")
_ROOT_FIELDS = frozenset({"installation", "root", "root_fingerprint"})
_SECOND_FIELDS = frozenset({"second", "second_fingerprint"})


@dataclass(frozen=True)
class Anchor:
    """What the anchor file says: the installation, its root SO and its second SO if any."""

    installation: str
    root: str
    root_fingerprint: str
    second: str | None = None
    second_fingerprint: str | None = None


def path_of(folder: Path) -> Path:
    """Return the anchor file of a witness folder."""
    return folder / FILE_NAME


def read(folder: Path) -> Anchor | None:
    """Return the anchor of the folder, or None when there is no anchor file.

    Raises:
        AuditError: the file cannot be read or is malformed (naming the line).
    """
    path = path_of(folder)
    try:
        text = path.read_bytes().decode("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(None, f"principal anchor {path}: cannot read: {exc}") from None
    return parse(text, str(path))


def parse(text: str, where: str) -> Anchor:
    """Parse the anchor file's text.

    Raises:
        AuditError: a line is not JSON, has other fields, or a value is malformed; the file has
            no root line or more than two lines.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not 1 <= len(lines) <= 2:
        raise AuditError(None, f"principal anchor {where}: {len(lines)} lines; 1 or 2 expected")
    root = _line(lines[0], _ROOT_FIELDS, f"{where} line 1")
    second = _line(lines[1], _SECOND_FIELDS, f"{where} line 2") if len(lines) == 2 else {}
    return Anchor(root["installation"], root["root"], root["root_fingerprint"],
                  second.get("second"), second.get("second_fingerprint"))


def _line(line: str, fields: frozenset[str], where: str) -> dict[str, str]:
    try:
        data: Any = json.loads(line)
    except ValueError:
        data = None
    if not isinstance(data, dict) or set(data) != fields:
        raise AuditError(None, f"principal anchor {where}: not a line with exactly "
                               f"{', '.join(sorted(fields))}")
    for name, value in data.items():
        if not isinstance(value, str) or not value or value != value.strip():
            raise AuditError(None, f"principal anchor {where}: {name} is not a name")
        if name.endswith("fingerprint") and not _FINGERPRINT.fullmatch(value):
            raise AuditError(None, f"principal anchor {where}: {name} is not a fingerprint")
    return data


def _json(fields: dict[str, str]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii") + b"\n"


def write_root(folder: Path, installation: str, name: str, fp: str) -> None:
    """Create the anchor naming the root security officer; a no-op if it says just that.

    Raises:
        AuditError: an anchor exists for another installation or another root, the folder
            is shared with other users, or the file cannot be written.
    """
    line = {"installation": installation, "root": name, "root_fingerprint": fp}
    _line(json.dumps(line), _ROOT_FIELDS, "new root")
    found = read(folder)
    if found is None:
        _create(folder, _json(line))
        found = read(folder)
    assert found is not None
    if (found.installation, found.root, found.root_fingerprint) != (installation, name, fp):
        raise AuditError(None, f"principal anchor {path_of(folder)} names root {found.root!r} "
                               f"of installation {found.installation}, not {name!r} of "
                               f"{installation}: point METERKEYS_WITNESS_DIR at this "
                               "installation's folder")


def add_second(folder: Path, installation: str, name: str, fp: str) -> None:
    """Append the second security officer to the anchor; a no-op if it names just that one.

    Raises:
        AuditError: no anchor, an anchor of another installation, another second already
            named, or the file cannot be written.
    """
    line = {"second": name, "second_fingerprint": fp}
    _line(json.dumps(line), _SECOND_FIELDS, "new second")
    path = path_of(folder)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except OSError as exc:
        raise AuditError(None, f"principal anchor {path}: cannot open: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        found = read(folder)
        assert found is not None
        _check_second(found, path, installation, name, fp)
        if found.second is None:
            os.write(fd, _json(line))
            os.fsync(fd)
    except OSError as exc:
        raise AuditError(None, f"principal anchor {path}: cannot append: {exc.strerror}") from None
    finally:
        os.close(fd)


def _check_second(found: Anchor, path: Path, installation: str, name: str, fp: str) -> None:
    if found.installation != installation:
        raise AuditError(None, f"principal anchor {path} belongs to installation "
                               f"{found.installation}, not {installation}")
    if found.second is not None and (found.second, found.second_fingerprint) != (name, fp):
        raise AuditError(None, f"principal anchor {path} already names the second security "
                               f"officer {found.second!r}")
    if name == found.root:
        raise AuditError(None, f"principal anchor {path}: {name!r} is the root")


def _create(folder: Path, data: bytes) -> None:
    # Written aside and linked into place (as the witness file is): no reader ever sees a
    # half-written anchor, and of two creators one wins and the other reads what it wrote.
    try:
        ensure_private_dir(folder, "witness folder")
    except ConfigError as exc:
        raise AuditError(None, str(exc)) from None
    path = path_of(folder)
    tmp = folder / f".{FILE_NAME}.{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise AuditError(None, f"principal anchor {path}: cannot create: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
