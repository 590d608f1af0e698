"""A simulated Head End System: the ``Hes`` port over simulated meters, with durable state.

Meters come from the simulated manufacturers' meter-secrets files (plaintext keys: simulator
only) and live in a registry (serial -> ``SimulatedMeter``, each with its mode). Their state and
the outcomes not yet collected are kept under the simulation home, so a run killed at any point
and started again finds the meters as the last completed call left them (what a real fleet would
show: a call cut short never reached the meters). Two files, both readable by their owner only:

- ``hes-meters.json``, a snapshot of every meter, written atomically, with a generation number;
- ``hes-meters.json.journal``, one JSON line appended (and flushed to disk) by each call that
  changes something: the meters it changed and the outcomes not yet collected, for the
  snapshot's generation. Loading applies the lines in order; a line cut short by a kill is the
  call that never completed, and is cut off. Once the journal outgrows the snapshot, the next
  call writes a new snapshot (the next generation) instead, and the journal goes.

So a call costs the simulator what it changed, not the whole fleet: rewriting every meter after
each call made a 100,000-meter claim spend 112 s of processor time (and its file writes) on the
state file alone.

The processor time spent inside the meters (unwrapping, installing, ciphering proofs) and on
the state file is counted apart (``meter_seconds``, ``state_seconds``: CPU seconds of the
calling thread, so work that other threads do meanwhile is not counted as the simulation's), and
a benchmark can leave the simulation's own work out.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lifecycle.clock import utcnow
from lifecycle.hes.files import write_atomically
from lifecycle.hes.port import (
    EXPORT_KINDS,
    CertificateImport,
    CertificateOrder,
    CertificateRequests,
    CsrAnswer,
    KeyOrder,
    Line,
    MeterRef,
    Outcome,
    encode_lines,
    outcome_line,
    parse_outcome,
    read_typed,
    typed_line,
)
from simulator.manufacturer import read_meter_secrets
from simulator.meter import SimulatedMeter, check_mode

STATE_FILE = "hes-meters.json"
JOURNAL_SUFFIX = ".journal"
STATE_VERSION = 1


class SimulatedHes:
    """The ``lifecycle.hes.port.Hes`` protocol over simulated meters."""

    def __init__(self, state_path: Path, meters: dict[str, SimulatedMeter],
                 clock: Callable[[], datetime] = utcnow, generation: int = 0) -> None:
        self.state_path = state_path
        self.journal_path = state_path.with_name(state_path.name + JOURNAL_SUFFIX)
        self.meters = meters
        self._pending: list[Outcome] = []
        self._clock = clock
        self.meter_seconds = 0.0
        self.state_seconds = 0.0
        self._generation = generation
        self._snapshot_bytes = 0
        self._journal_bytes = 0

    @classmethod
    def open(cls, home: Path, secrets_files: Iterable[Path] = (),
             modes: Mapping[str, str] | None = None, engine: str = "gurux",
             clock: Callable[[], datetime] = utcnow) -> SimulatedHes:
        """Load the HES from ``home``, adding the meters of ``secrets_files`` it does not know.

        A meter already known keeps its state (keys, counter); ``modes`` sets the mode of the
        serials it names (others keep theirs, new ones are ``ok``).

        Raises:
            ValueError: an unknown mode, or a state file of another version.
        """
        hes = cls.load(home, clock) if (home / STATE_FILE).exists() else \
            cls(home / STATE_FILE, {}, clock=clock)
        for path in secrets_files:
            for record in read_meter_secrets(path):
                if str(record["serial"]) not in hes.meters:
                    meter = SimulatedMeter.from_secrets(record)
                    meter.engine = engine
                    hes.meters[meter.serial] = meter
        for serial, mode in (modes or {}).items():
            hes.meters[serial].mode = check_mode(mode)
        hes.save()
        return hes

    @classmethod
    def load(cls, home: Path, clock: Callable[[], datetime] = utcnow) -> SimulatedHes:
        """Load the HES's state file from ``home``.

        Raises:
            ValueError: the file is of another version.
            OSError: the file cannot be read.
        """
        path = home / STATE_FILE
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text)
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: state version {doc.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        hes = cls(path, {m["serial"]: SimulatedMeter.from_state(m) for m in doc["meters"]},
                  clock=clock, generation=int(doc.get("generation", 0)))
        outcomes = doc["outcomes"]
        for change in hes._journal():
            hes.meters.update((m["serial"], SimulatedMeter.from_state(m))
                              for m in change["meters"])
            outcomes = change["outcomes"]
        hes._pending = [parse_outcome(line, f"{path} outcome {i}")
                        for i, line in enumerate(outcomes, start=1)]
        hes._snapshot_bytes = len(text)
        return hes

    def _journal(self) -> list[dict[str, Any]]:
        """The journal's changes to this snapshot, in order. A last line cut short (a call
        killed while it appended) is cut off the file; a journal left from an older snapshot
        (a kill between writing the new snapshot and removing the journal) is removed."""
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return []
        changes: list[dict[str, Any]] = []
        kept = 0
        for line in data.split(b"\n")[:-1]:  # what follows the last newline is cut short
            try:
                change = json.loads(line)
            except ValueError:
                break
            if change.get("generation") != self._generation:
                break
            changes.append(change)
            kept += len(line) + 1
        if not changes:
            self.journal_path.unlink()
        elif kept < len(data):
            os.truncate(self.journal_path, kept)
        self._journal_bytes = kept
        return changes

    def save(self) -> None:
        """Write every meter and the uncollected outcomes as a new snapshot (atomically, mode
        0600), and remove the journal it replaces."""
        started = time.thread_time()
        self._generation += 1
        doc: dict[str, Any] = {"version": STATE_VERSION, "generation": self._generation,
                               "meters": [m.to_state() for m in self.meters.values()],
                               "outcomes": [outcome_line(o) for o in self._pending]}
        text = json.dumps(doc)
        write_atomically(self.state_path, text)
        self.journal_path.unlink(missing_ok=True)
        self._snapshot_bytes, self._journal_bytes = len(text), 0
        self.state_seconds += time.thread_time() - started

    def _saved(self, serials: Iterable[str]) -> None:
        """Record what a call changed: the meters of ``serials`` and the outcomes not yet
        collected, as one line appended to the journal and flushed to disk; a new snapshot
        instead once the journal would outgrow the last one."""
        started = time.thread_time()
        line = json.dumps({"generation": self._generation,
                           "meters": [self.meters[s].to_state() for s in dict.fromkeys(serials)
                                      if s in self.meters],
                           "outcomes": [outcome_line(o) for o in self._pending]}).encode() + b"\n"
        if self._journal_bytes + len(line) > self._snapshot_bytes:
            self.state_seconds += time.thread_time() - started
            self.save()
            return
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._journal_bytes += len(line)
        self.state_seconds += time.thread_time() - started

    def set_mode(self, serial: str, mode: str) -> None:
        """Change a meter's mode and save.

        Raises:
            KeyError: unknown serial.
            ValueError: unknown mode.
        """
        self.meters[serial].mode = check_mode(mode)
        self._saved([serial])

    # --- the Hes protocol ----------------------------------------------------------------------
    def submit(self, orders: Sequence[KeyOrder]) -> None:
        """Run each order on its meter at once; the outcomes wait for ``outcomes()``.

        An order for an unknown meter, or for a known serial with another system title, is
        ``failed``; a meter that does not answer gives ``timeout``.
        """
        for order in orders:
            self._pending.append(self._run(order))
        self._saved(order.meter_serial for order in orders)

    def _run(self, order: KeyOrder) -> Outcome:
        meter = self.meters.get(order.meter_serial)
        if meter is None:
            return self._outcome(order, "failed", None)
        started = time.thread_time()
        answer = meter.handle_order(bytes.fromhex(order.system_title), order.key_data,
                                    order.challenge)
        self.meter_seconds += time.thread_time() - started
        if answer is None:
            return self._outcome(order, "timeout", None)
        return self._outcome(order, answer.status, answer.proof)

    def _outcome(self, order: KeyOrder, status: str, proof: bytes | None) -> Outcome:
        return Outcome(order.order_id, order.meter_serial, status,  # type: ignore[arg-type]
                       proof, self._clock())

    def outcomes(self) -> list[Outcome]:
        """Return and forget the outcomes reported since the last call."""
        out, self._pending = self._pending, []
        self._saved(())
        return out

    def prove(self, serial: str, system_title: str, challenge: bytes) -> bytes | None:
        """Have a meter answer a challenge under the GUEK it holds now; ``None`` for an unknown
        meter or another system title."""
        meter = self.meters.get(serial)
        if meter is None or meter.system_title != bytes.fromhex(system_title):
            return None
        started = time.thread_time()
        proof = meter.prove(challenge)
        self.meter_seconds += time.thread_time() - started
        self._saved([serial])
        return proof

    def certificate_requests(self, meters: Sequence[MeterRef]) -> CertificateRequests:
        """Have each known suite 1/2 meter make its two requests (signature, key agreement);
        an unknown meter, another system title or a silent meter gives none."""
        out: CertificateRequests = {}
        started = time.thread_time()
        for ref in meters:
            meter = self.meters.get(ref.serial)
            if meter is None or meter.mode == "silent" or \
                    meter.system_title != bytes.fromhex(ref.system_title):
                continue
            try:
                out[ref.serial] = (meter.certificate_request("signature"),
                                   meter.certificate_request("key_agreement"))
            except ValueError:
                continue
        self.meter_seconds += time.thread_time() - started
        self._saved(ref.serial for ref in meters)
        return out

    def import_certificates(self, orders: Sequence[CertificateOrder]) -> None:
        """Put each order's two certificates on its meter (a meter refuses a certificate for a
        key it does not hold: it keeps what it had)."""
        started = time.thread_time()
        for order in orders:
            meter = self.meters.get(order.meter_serial)
            if meter is None:
                continue
            for der in (order.signature_certificate, order.key_agreement_certificate):
                try:
                    meter.import_certificate(der)
                except ValueError:
                    continue
        self.meter_seconds += time.thread_time() - started
        self._saved(order.meter_serial for order in orders)

    # --- the command line's files (meterkeys orders export/confirm) ------------------------------
    def answer_file(self, export: Path, answers: Path) -> None:
        """Play a real HES on an ``orders export`` file: run its key orders, make the requests
        it asks for, import its certificates; write the answers, one typed line each.

        Raises:
            PortError: a line of the export is malformed.
        """
        items, errors = read_typed(export.read_text(encoding="utf-8"), str(export), EXPORT_KINDS)
        if errors:
            raise errors[0]
        self.submit([i for i in items if isinstance(i, KeyOrder)])
        lines: list[Line] = list(self.outcomes())
        asks = [i for i in items if isinstance(i, MeterRef)]
        lines += [CsrAnswer(serial, *pair)
                  for serial, pair in self.certificate_requests(asks).items()]
        lines += [self._imported(o) for o in items if isinstance(o, CertificateOrder)]
        self.save()
        write_atomically(answers, encode_lines(typed_line(i) for i in lines))

    def _imported(self, order: CertificateOrder) -> CertificateImport:
        meter = self.meters.get(order.meter_serial)
        try:
            if meter is None:
                raise ValueError(f"unknown meter {order.meter_serial}")
            for der in (order.signature_certificate, order.key_agreement_certificate):
                meter.import_certificate(der)
        except ValueError:
            return CertificateImport(order.order_id, order.meter_serial, "failed", self._clock())
        return CertificateImport(order.order_id, order.meter_serial, "ok", self._clock())
