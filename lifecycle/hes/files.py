"""FileHes: the port over files, for a real HES that exchanges JSON lines.

``export`` writes orders (wrapped keys and challenges only) to a file, atomically and readable by
its owner only; ``confirm`` reads the HES's outcomes back, strictly.

Certificates go the same way beside them: ``csr-requests.jsonl`` (the meters asked for their
two certificate requests), ``csrs.jsonl`` (the HES's answers, read strictly),
``certificates.jsonl`` (the certificates to import).

The files grow rather than being replaced: a HES that has not read ``orders.jsonl`` yet when the
next chunk is submitted must still find the earlier chunks' orders there. Each submit rewrites
the file (atomically, 0600) as the orders already in it that no new attempt superseded, then the
new ones, each order once (``merged_orders``); ``csr-requests.jsonl`` keeps each meter once.

The command line's exchange (``meterkeys orders export/confirm``) is one file each way with a
``type`` on every line (``lifecycle.hes.port.typed_line``; docs/hes-files.md): ``export_work``
writes it, ``read_answers`` reads the HES's answer, keeping the good lines.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lifecycle.errors import PortError
from lifecycle.hes.port import (
    Answers,
    CertificateOrder,
    CertificateRequests,
    KeyOrder,
    Line,
    MeterRef,
    Outcome,
    certificate_order_line,
    decode_csrs,
    decode_meters,
    decode_orders,
    decode_outcomes,
    encode_lines,
    meter_line,
    order_line,
    read_answers,
    typed_line,
)

CSR_ASKS, CSR_ANSWERS, CERTIFICATES = "csr-requests.jsonl", "csrs.jsonl", "certificates.jsonl"
_T = TypeVar("_T")


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a private temporary file, fsync and rename.

    A reader (or a process killed half-way) sees the old file or the new one, never a part.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bytes(path: Path) -> bytes:
    """Read a HES file whole (once: what is digested is what is read).

    Raises:
        PortError: the file cannot be read.
    """
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PortError(str(path), f"cannot be read ({type(exc).__name__})") from None


def _read_text(path: Path) -> str:
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise PortError(str(path), "is not UTF-8") from None


def merged_orders(existing: Sequence[KeyOrder], new: Sequence[KeyOrder]) -> list[KeyOrder]:
    """Return what an orders file holds once ``new`` is added: the existing orders not
    superseded (a meter's new attempt replaces its older orders, as in the inventory), then the
    new ones, each order id once."""
    renewed = {o.meter_serial for o in new}
    kept = [o for o in existing if o.meter_serial not in renewed]
    return _once(kept, new, lambda o: o.order_id)


def merged_asks(existing: Sequence[MeterRef], new: Sequence[MeterRef]) -> list[MeterRef]:
    """Return what a certificate-request asks file holds once ``new`` is added: each meter
    once, its latest ask."""
    renewed = {m.serial for m in new}
    return _once([m for m in existing if m.serial not in renewed], new, lambda m: m.serial)


def _once(kept: Sequence[_T], new: Sequence[_T], key: Callable[[_T], str]) -> list[_T]:
    seen = {key(i) for i in kept}
    out = list(kept)
    for item in new:
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
    return out


class FileHes:
    """A HES reached through files: orders written to ``orders_path``, outcomes read from
    ``outcomes_path``. ``prove`` is not offered over files (``None``: ask the HES operator)."""

    def __init__(self, orders_path: Path, outcomes_path: Path) -> None:
        self.orders_path = orders_path
        self.outcomes_path = outcomes_path

    @staticmethod
    def export(orders: Sequence[KeyOrder], path: Path) -> None:
        """Write orders as JSON lines (mode 0600), replacing the file atomically."""
        write_atomically(path, encode_lines(order_line(o) for o in orders))

    @staticmethod
    def confirm(path: Path) -> list[Outcome]:
        """Read a HES's outcomes.

        Raises:
            PortError: the file is missing, not UTF-8, or a line is malformed (file and line
                named).
        """
        return decode_outcomes(_read_text(path), str(path))

    @staticmethod
    def export_work(path: Path, orders: Sequence[KeyOrder], asks: Sequence[MeterRef],
                    certificates: Sequence[CertificateOrder]) -> None:
        """Write the command line's one-file export (mode 0600, replaced atomically): key
        orders, certificate-request asks and certificate orders, each line with its ``type``."""
        lines: list[Line] = [*orders, *asks, *certificates]
        write_atomically(path, encode_lines(typed_line(i) for i in lines))

    @staticmethod
    def read_answers(data: bytes, path: Path) -> Answers:
        """Read a HES's one-file answer (outcomes, certificate requests, certificate imports):
        the good lines, and a ``PortError`` naming each bad one.

        Raises:
            PortError: the file is not UTF-8 (no line can be trusted then).
        """
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PortError(str(path), "is not UTF-8") from None
        return read_answers(text, str(path))

    def submit(self, orders: Sequence[KeyOrder]) -> None:
        """Add the orders to ``orders_path`` (``merged_orders``: earlier chunks' orders stay
        until a new attempt supersedes them).

        Raises:
            PortError: the orders file there is malformed (it is left as it is).
        """
        before = self._existing(self.orders_path, decode_orders)
        self.export(merged_orders(before, orders), self.orders_path)

    def outcomes(self) -> list[Outcome]:
        """Read ``outcomes_path`` (empty when the HES has written none yet).

        Raises:
            PortError: the file is malformed.
        """
        if not self.outcomes_path.exists():
            return []
        return self.confirm(self.outcomes_path)

    def prove(self, serial: str, system_title: str, challenge: bytes) -> bytes | None:
        """A file HES answers no live challenge."""
        return None

    def certificate_requests(self, meters: Sequence[MeterRef]) -> CertificateRequests:
        """Write the meters asked to ``csr-requests.jsonl``; return the answers of those meters
        found in ``csrs.jsonl`` (both beside the outcomes file).

        Raises:
            PortError: ``csrs.jsonl`` or ``csr-requests.jsonl`` is malformed (file and line
                named).
        """
        folder = self.outcomes_path.parent
        asks = merged_asks(self._existing(folder / CSR_ASKS, decode_meters), meters)
        write_atomically(folder / CSR_ASKS, encode_lines(meter_line(m) for m in asks))
        answers = folder / CSR_ANSWERS
        if not answers.exists():
            return {}
        found = decode_csrs(_read_text(answers), str(answers))
        return {m.serial: found[m.serial] for m in meters if m.serial in found}

    @staticmethod
    def _existing(path: Path, decode: Callable[[str, str], list[_T]]) -> list[_T]:
        return decode(_read_text(path), str(path)) if path.exists() else []

    def import_certificates(self, orders: Sequence[CertificateOrder]) -> None:
        """Add the certificate orders to ``certificates.jsonl`` beside the orders file (the file
        grows: every chunk's certificates stay there until the HES operator takes them)."""
        path = self.orders_path.parent / CERTIFICATES
        before = path.read_text(encoding="utf-8") if path.exists() else ""
        write_atomically(path, before + encode_lines(certificate_order_line(o) for o in orders))
