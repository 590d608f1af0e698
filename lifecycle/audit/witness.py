"""Witnesses of the audit trail: where signed heads go besides the inventory.

A writer of the inventory database can rewrite, re-chain, truncate or empty the audit tables, and
with the PIN re-sign every checkpoint; what they cannot do is take back a head already handed to
a witness they cannot write. Each checkpoint's signed head is therefore appended to a witness as
soon as the checkpoint has committed (``lifecycle.audit.trail``), and ``audit verify`` checks the
chain against what the witness holds (``lifecycle.audit.chain.verify_chain``).

Two kinds (``Settings.witness_kind``):

- ``file`` (default): an append-only file ``audit-witness.jsonl`` in a folder of its own
  (``Settings.witness_dir``, default ``<home>/witness``, mode 0700). The first line is a header
  naming the installation; then one JSON line per checkpoint: purpose, installation, seq, head,
  time, signature (base64 DER) and the audit key's fingerprint. Every append opens the file
  ``O_APPEND`` under an exclusive ``flock`` and fsyncs. The embedded default keeps the folder in
  the home; in production put it where the inventory's writers cannot write (another host's
  mount, an append-only ``chattr +a`` file, a WORM volume).
- ``file+syslog``: the file as above, and each record also sent to a syslog sink
  (``Settings.witness_syslog_address``: ``host:port`` over UDP, or a socket path), for a
  collector the meterkeys hosts cannot rewrite. Syslog is append-only from here: ``audit verify``
  reads the file; compare the collector's copy with it (same lines) to check the file itself.

A witness belongs to one installation: appending a head of another installation is refused, so
an inventory whose identity was replaced, or a fresh inventory pointed at an old witness, is
caught at its first checkpoint rather than at verification.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import logging.handlers
import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from lifecycle.audit.chain import CHECKPOINT_PURPOSE, SignedHead, WitnessLog
from lifecycle.config import Settings, ensure_private_dir
from lifecycle.errors import AuditError, ConfigError

WITNESS_PURPOSE = "meterkeys-audit-witness/1"
FILE_NAME = "audit-witness.jsonl"
SYSLOG_IDENT = "meterkeys-audit-witness: "


class Witness(Protocol):
    """Somewhere outside the inventory that keeps every signed head it is given."""

    def bind(self, installation: str) -> None:
        """Make the witness the installation's, or refuse one that belongs to another.

        Raises:
            AuditError: the witness belongs to another installation, or cannot be written.
        """

    def append(self, record: SignedHead) -> None:
        """Keep one signed head.

        Raises:
            AuditError: the record could not be kept.
        """

    def records(self) -> WitnessLog:
        """Return what the witness holds.

        Raises:
            AuditError: the witness cannot be read back, or is malformed.
        """


def from_settings(settings: Settings) -> Witness:
    """Return the witness the settings name (``file``, or ``file+syslog``)."""
    file = FileWitness(settings.witness_path)
    if settings.witness_kind == "file+syslog":
        return Both(file, SyslogWitness(settings.witness_syslog_address))
    return file


def file_of(settings: Settings) -> FileWitness:
    """Return the file witness of the settings: the one ``audit verify`` reads."""
    return FileWitness(settings.witness_path)


# --- encoding ------------------------------------------------------------------------------------
def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def encode(record: SignedHead) -> str:
    """Return a record as one canonical JSON line (no newline)."""
    return json.dumps({
        "purpose": CHECKPOINT_PURPOSE, "installation": record.installation, "seq": record.seq,
        "head": record.head_hash, "time": _iso(record.at),
        "signature": base64.b64encode(record.signature).decode("ascii"), "key": record.key,
    }, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def decode(line: str) -> SignedHead:
    """Parse one record line.

    Raises:
        ValueError: not a checkpoint record of this format.
    """
    data = json.loads(line)
    if not isinstance(data, dict) or data.get("purpose") != CHECKPOINT_PURPOSE:
        raise ValueError("not a checkpoint record")
    try:
        installation, seq, head, key = (data["installation"], data["seq"], data["head"],
                                        data["key"])
        at = datetime.fromisoformat(data["time"])
        signature = base64.b64decode(data["signature"], validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ValueError("a checkpoint record lacks a field") from exc
    if not (isinstance(installation, str) and type(seq) is int and isinstance(head, str)
            and isinstance(key, str) and at.utcoffset() is not None):
        raise ValueError("a checkpoint record has a field of the wrong type")
    return SignedHead(installation, seq, head, at, signature, key)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _header(installation: str, at: datetime) -> str:
    return json.dumps({"purpose": WITNESS_PURPOSE, "installation": installation,
                       "created_at": _iso(at)}, sort_keys=True, separators=(",", ":"))


# --- the file ------------------------------------------------------------------------------------
class FileWitness:
    """The append-only witness file in a folder of its own (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / FILE_NAME

    def bind(self, installation: str) -> None:
        """Create the file with a header naming the installation, or check the header's.

        Raises:
            AuditError: the file belongs to another installation, or cannot be written.
        """
        if not self.path.exists():
            self._create(installation)
        found = self._read_header()
        if found != installation:
            raise AuditError(None, f"witness {self.path} belongs to installation {found}, not "
                                   f"to this inventory's {installation}: point "
                                   "METERKEYS_WITNESS_DIR at this installation's witness")

    def append(self, record: SignedHead) -> None:
        """Append one record line under an exclusive lock, then fsync.

        Raises:
            AuditError: the file belongs to another installation, or cannot be written.
        """
        self.bind(record.installation)
        line = encode(record).encode("ascii") + b"\n"
        try:
            with self._locked() as fd:
                size = os.fstat(fd).st_size
                # A line torn by a crash (no newline) is closed, never continued.
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
        except OSError as exc:
            raise AuditError(record.seq, f"witness {self.path}: cannot append the signed head: "
                                         f"{exc.strerror}") from None

    def records(self) -> WitnessLog:
        """Return the installation of the header and every record; none when there is no file.

        A line that is not JSON at all is an append torn by a crash (the next append closes it
        with a newline, ``append``) and is skipped: a record lost that way only makes the
        witness hold less, never something else.

        Raises:
            AuditError: the file cannot be read, or a JSON line is not a record (naming it).
        """
        try:
            with self.path.open("rb") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH)  # no half-appended line is read
                lines = fh.read().decode("ascii", errors="replace").split("\n")
        except FileNotFoundError:
            return WitnessLog(str(self.path), None)
        except OSError as exc:
            raise AuditError(None, f"witness {self.path}: cannot read: {exc.strerror}") from None
        installation = self._parse_header(lines[0])
        records = []
        for number, line in enumerate(lines[1:], start=2):
            if not _is_json(line):
                continue
            try:
                records.append(decode(line))
            except ValueError:
                raise AuditError(None, f"witness {self.path} line {number}: not a checkpoint "
                                       "record") from None
        return WitnessLog(str(self.path), installation, tuple(records))

    def _create(self, installation: str) -> None:
        # Written aside and linked into place: a reader or another creator never sees a file
        # without its header, and of two creators one wins and the other checks its header.
        try:
            ensure_private_dir(self.folder, "witness folder")
        except ConfigError as exc:  # names the folder and the fix
            raise AuditError(None, str(exc)) from None
        tmp = self.folder / f".{FILE_NAME}.{uuid.uuid4().hex[:12]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, _header(installation, datetime.now(UTC)).encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise AuditError(None, f"witness {self.path}: cannot create: {exc.strerror}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _read_header(self) -> str:
        try:
            with self.path.open("rb") as fh:
                first = fh.readline().decode("ascii", errors="replace")
        except OSError as exc:
            raise AuditError(None, f"witness {self.path}: cannot read: {exc.strerror}") from None
        return self._parse_header(first)

    def _parse_header(self, line: str) -> str:
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("purpose") != WITNESS_PURPOSE \
                or not isinstance(data.get("installation"), str):
            raise AuditError(None, f"witness {self.path} line 1: not a witness header")
        return str(data["installation"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        # O_APPEND: every write lands at the end, whatever another writer did meanwhile.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- syslog --------------------------------------------------------------------------------------
class _StrictSysLogHandler(logging.handlers.SysLogHandler):
    """A syslog handler that raises what it cannot send, rather than printing it."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        raise  # noqa: PLE0704 - re-raises the error emit() is handling


class SyslogWitness:
    """Each record as one syslog message (facility ``auth``), append-only: see the module
    docstring."""

    def __init__(self, address: str) -> None:
        self.address = address

    def bind(self, installation: str) -> None:
        """Nothing to check: a syslog collector keeps every installation's lines."""

    def append(self, record: SignedHead) -> None:
        """Send one record line to the syslog sink.

        Raises:
            AuditError: the message could not be sent.
        """
        where: Any
        if self.address.startswith("/"):
            where, kind = self.address, None
        else:
            host, _, port = self.address.rpartition(":")
            where, kind = (host or "localhost", int(port or 514)), socket.SOCK_DGRAM
        try:
            handler = _StrictSysLogHandler(where, logging.handlers.SysLogHandler.LOG_AUTH,
                                           kind)
        except OSError as exc:
            raise AuditError(record.seq, f"witness syslog {self.address}: cannot connect: "
                                         f"{exc.strerror}") from None
        handler.ident = SYSLOG_IDENT
        message = logging.LogRecord("meterkeys.audit.witness", logging.INFO, __file__, 0,
                                    encode(record), None, None)
        try:
            handler.emit(message)
        except OSError as exc:
            raise AuditError(record.seq, f"witness syslog {self.address}: cannot send: "
                                         f"{exc.strerror}") from None
        finally:
            handler.close()

    def records(self) -> WitnessLog:
        """Refuse: a syslog sink is append-only from here.

        Raises:
            AuditError: always; ``audit verify`` reads the file witness.
        """
        raise AuditError(None, f"witness syslog {self.address} is append-only: verify reads the "
                               "file witness")


class Both:
    """The file witness and a syslog witness: records go to both, are read from the file."""

    def __init__(self, file: FileWitness, syslog: SyslogWitness) -> None:
        self.file, self.syslog = file, syslog

    def bind(self, installation: str) -> None:
        """Bind the file (see ``FileWitness.bind``).

        Raises:
            AuditError: the file belongs to another installation, or cannot be written.
        """
        self.file.bind(installation)

    def append(self, record: SignedHead) -> None:
        """Append to the file, then send to syslog.

        Raises:
            AuditError: either could not keep the record.
        """
        self.file.append(record)
        self.syslog.append(record)

    def records(self) -> WitnessLog:
        """Return what the file holds.

        Raises:
            AuditError: see ``FileWitness.records``.
        """
        return self.file.records()
