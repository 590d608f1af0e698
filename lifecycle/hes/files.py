"""FileHes: the port over files, for a real HES that exchanges JSON lines.

``export`` writes orders (wrapped keys and challenges only) to a file, atomically and readable by
its owner only; ``confirm`` reads the HES's outcomes back, strictly. The command line
(``meterkeys orders export/confirm``) comes with the claim.

Certificates go the same way beside them: ``csr-requests.jsonl`` (the meters asked for their
two certificate requests), ``csrs.jsonl`` (the HES's answers, read strictly),
``certificates.jsonl`` (the certificates to import).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lifecycle.errors import PortError
from lifecycle.hes.port import (
    CertificateOrder,
    CertificateRequests,
    KeyOrder,
    MeterRef,
    Outcome,
    certificate_order_line,
    decode_csrs,
    decode_outcomes,
    encode_lines,
    meter_line,
    order_line,
)

CSR_ASKS, CSR_ANSWERS, CERTIFICATES = "csr-requests.jsonl", "csrs.jsonl", "certificates.jsonl"


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
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PortError(str(path), f"cannot be read ({type(exc).__name__})") from None
        return decode_outcomes(text, str(path))

    def submit(self, orders: Sequence[KeyOrder]) -> None:
        """Export the orders to ``orders_path``."""
        self.export(orders, self.orders_path)

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
            PortError: ``csrs.jsonl`` is malformed (file and line named).
        """
        folder = self.outcomes_path.parent
        write_atomically(folder / CSR_ASKS, encode_lines(meter_line(m) for m in meters))
        answers = folder / CSR_ANSWERS
        if not answers.exists():
            return {}
        try:
            text = answers.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PortError(str(answers), f"cannot be read ({type(exc).__name__})") from None
        found = decode_csrs(text, str(answers))
        return {m.serial: found[m.serial] for m in meters if m.serial in found}

    def import_certificates(self, orders: Sequence[CertificateOrder]) -> None:
        """Add the certificate orders to ``certificates.jsonl`` beside the orders file (the file
        grows: every chunk's certificates stay there until the HES operator takes them)."""
        path = self.orders_path.parent / CERTIFICATES
        before = path.read_text(encoding="utf-8") if path.exists() else ""
        write_atomically(path, before + encode_lines(certificate_order_line(o) for o in orders))
