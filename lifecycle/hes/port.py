"""The HES port: key orders out, outcomes in, as data and as JSON lines.

An order asks a HES to run Security Setup ``global_key_transfer`` on one meter with the given
key_data, then to have the meter answer the challenge with a general-glo-ciphering APDU under its
new GUEK (``lifecycle.dlms.proof``). An outcome reports what the HES saw: ``ok`` (with the proof),
``not_ok`` (the meter refused or said so), ``failed`` (the HES could not run it), ``timeout``
(no answer). meterkeys never takes a status on trust: only a proof that checks in the HSM
confirms an order.

Certificates (suite 1 and 2, after the claim): ``certificate_requests`` has the HES run DLMS
Security Setup methods 4 ``generate_key_pair`` and 5 ``generate_certificate_request`` (Blue Book
DLMS UA 1000-1 §4.4.7, class id 64 version 1; Green Book DLMS UA 1000-2 §9.2.6) on each meter,
once for the digital-signature key and once for the key-agreement key, and return the two
PKCS#10 requests (DER); a ``CertificateOrder`` carries the two certificates the DSO's device CA
issued, for the HES to put on the meter with method 6 ``import_certificate``. Certificates and
requests are public: they carry no secret.

JSON lines: one object per line, bytes as hex, times as ISO 8601 with a zone. Decoding is
strict: an unknown or missing field, a wrong type, bad hex or a naive time is refused with the
file and line named (``PortError``, under the project's error root). ``FIELDS`` is the one table
of every kind's fields.

The file exchange of the command line (``meterkeys orders export/confirm``, docs/hes-files.md)
puts every kind in one file, each line with a ``type`` (``typed_line``): the export carries
``key_order``, ``csr_ask`` and ``certificate_order`` lines, the HES's answer ``outcome``, ``csrs``
and ``certificate_import`` lines. One file each way, so the digest an operator signs for a
confirmation covers everything it settles. ``read_answers`` keeps the good lines of a file and
names each bad one.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, get_args

from lifecycle.errors import PortError

Status = Literal["ok", "not_ok", "failed", "timeout"]
STATUSES: tuple[str, ...] = get_args(Status)
ImportStatus = Literal["ok", "failed"]
IMPORT_STATUSES: tuple[str, ...] = get_args(ImportStatus)
SYSTEM_TITLE_HEX = 16
ORDER_ID_MAX = 40
HEX_RUN = re.compile(r"[0-9a-fA-F]{32}")


def new_order_id(prefix: str) -> str:
    """A new order id: ``prefix``, a dash, the time in milliseconds (11 hex digits) and 48
    random bits (12 hex digits).

    Ids made later sort later, so a chunk's orders are added at the end of the orders' primary
    key index. Wholly random ids landed all over it, and each chunk rewrote index pages across
    the whole table, a cost that grew with the table. The random part keeps ids unguessable and
    unique within a millisecond. Its 23 hex digits stay short of the 32-digit runs
    (``HEX_RUN``) that the audit trail and the line checks refuse as possible key material.
    """
    return f"{prefix}-{time.time_ns() // 1_000_000:011X}{secrets.token_hex(6).upper()}"

@dataclass(frozen=True)
class KeyOrder:
    """One key change for one meter. ``key_data`` holds only wrapped keys (never plaintext)."""

    order_id: str
    meter_serial: str
    system_title: str  # 16 hex digits, upper case (the inventory's form)
    suite: int
    key_data: bytes
    challenge: bytes
    created_at: datetime

    def __repr__(self) -> str:
        return f"KeyOrder({self.order_id!r}, meter {self.meter_serial})"


@dataclass(frozen=True)
class Outcome:
    """What a HES reports for one order; ``proof_apdu`` is the meter's answer to the challenge."""

    order_id: str
    meter_serial: str
    status: Status
    proof_apdu: bytes | None
    reported_at: datetime


@dataclass(frozen=True)
class MeterRef:
    """A meter as a HES addresses it."""

    serial: str
    system_title: str  # 16 hex digits, upper case
    suite: int


# serial -> (signature request, key-agreement request), PKCS#10 DER
CertificateRequests = dict[str, tuple[bytes, bytes]]


@dataclass(frozen=True)
class CertificateOrder:
    """Two operational certificates (X.509 DER) for the HES to import on one meter."""

    order_id: str
    meter_serial: str
    system_title: str
    signature_certificate: bytes
    key_agreement_certificate: bytes
    created_at: datetime

    def __repr__(self) -> str:
        return f"CertificateOrder({self.order_id!r}, meter {self.meter_serial})"


@dataclass(frozen=True)
class CsrAnswer:
    """One meter's two certificate requests (PKCS#10 DER) as a HES returns them."""

    meter_serial: str
    signature_csr: bytes
    key_agreement_csr: bytes


@dataclass(frozen=True)
class CertificateImport:
    """What a HES reports for one certificate order: ``ok`` (both certificates are on the meter)
    or ``failed`` (offer them again)."""

    order_id: str
    meter_serial: str
    status: ImportStatus
    reported_at: datetime


class Hes(Protocol):
    """A Head End System as meterkeys uses it."""

    def submit(self, orders: Sequence[KeyOrder]) -> None:
        """Hand orders to the HES (it runs them when it can)."""

    def outcomes(self) -> list[Outcome]:
        """Return the outcomes reported since the last call."""

    def prove(self, serial: str, system_title: str, challenge: bytes) -> bytes | None:
        """Ask a meter to answer a challenge under the GUEK it holds now (recovery); ``None``
        when the meter cannot be reached."""

    def certificate_requests(self, meters: Sequence[MeterRef]) -> CertificateRequests:
        """Have each meter make its signature and key-agreement key pairs and a PKCS#10 request
        for each (Security Setup methods 4 and 5); return the requests of the meters that
        answered (a meter missing from the result did not)."""

    def import_certificates(self, orders: Sequence[CertificateOrder]) -> None:
        """Hand certificates to the HES, to be put on their meters (Security Setup method 6)."""


class OneAtATime:
    """A HES whose calls are made one at a time.

    The claim's tasks run in threads (the next chunks' keys are made while one chunk is settled
    and an earlier one certified), and a HES adapter need not be thread-safe: a file or a
    simulator's state written by two calls at once could lose one of them.
    """

    def __init__(self, hes: Hes) -> None:
        self.hes = hes
        self._lock = threading.Lock()

    def submit(self, orders: Sequence[KeyOrder]) -> None:
        """As ``Hes.submit``."""
        with self._lock:
            self.hes.submit(orders)

    def outcomes(self) -> list[Outcome]:
        """As ``Hes.outcomes``."""
        with self._lock:
            return self.hes.outcomes()

    def prove(self, serial: str, system_title: str, challenge: bytes) -> bytes | None:
        """As ``Hes.prove``."""
        with self._lock:
            return self.hes.prove(serial, system_title, challenge)

    def certificate_requests(self, meters: Sequence[MeterRef]) -> CertificateRequests:
        """As ``Hes.certificate_requests``."""
        with self._lock:
            return self.hes.certificate_requests(meters)

    def import_certificates(self, orders: Sequence[CertificateOrder]) -> None:
        """As ``Hes.import_certificates``."""
        with self._lock:
            self.hes.import_certificates(orders)


# --- JSON lines ------------------------------------------------------------------------------
# kind -> field -> the JSON type(s) it takes; every line of every file is checked against this.
FIELDS: dict[str, dict[str, Any]] = {
    "key_order": {"order_id": str, "meter_serial": str, "system_title": str, "suite": int,
                  "key_data": str, "challenge": str, "created_at": str},
    "outcome": {"order_id": str, "meter_serial": str, "status": str,
                "proof_apdu": (str, type(None)), "reported_at": str},
    "csr_ask": {"meter_serial": str, "system_title": str, "suite": int},
    "csrs": {"meter_serial": str, "signature_csr": str, "key_agreement_csr": str},
    "certificate_order": {"order_id": str, "meter_serial": str, "system_title": str,
                          "signature_certificate": str, "key_agreement_certificate": str,
                          "created_at": str},
    "certificate_import": {"order_id": str, "meter_serial": str, "status": str,
                           "reported_at": str},
}
EXPORT_KINDS = ("key_order", "csr_ask", "certificate_order")  # meterkeys -> HES
ANSWER_KINDS = ("outcome", "csrs", "certificate_import")  # HES -> meterkeys
TYPE = "type"

Line = KeyOrder | Outcome | MeterRef | CsrAnswer | CertificateOrder | CertificateImport


def _doc(item: Line) -> tuple[str, dict[str, Any]]:
    """The kind of a line and its fields (bytes as hex, times ISO 8601)."""
    if isinstance(item, KeyOrder):
        return "key_order", {"order_id": item.order_id, "meter_serial": item.meter_serial,
                             "system_title": item.system_title, "suite": item.suite,
                             "key_data": item.key_data.hex(), "challenge": item.challenge.hex(),
                             "created_at": item.created_at.isoformat()}
    if isinstance(item, Outcome):
        proof = None if item.proof_apdu is None else item.proof_apdu.hex()
        return "outcome", {"order_id": item.order_id, "meter_serial": item.meter_serial,
                           "status": item.status, "proof_apdu": proof,
                           "reported_at": item.reported_at.isoformat()}
    if isinstance(item, MeterRef):
        return "csr_ask", {"meter_serial": item.serial, "system_title": item.system_title,
                           "suite": item.suite}
    if isinstance(item, CsrAnswer):
        return "csrs", {"meter_serial": item.meter_serial,
                        "signature_csr": item.signature_csr.hex(),
                        "key_agreement_csr": item.key_agreement_csr.hex()}
    if isinstance(item, CertificateOrder):
        return "certificate_order", {
            "order_id": item.order_id, "meter_serial": item.meter_serial,
            "system_title": item.system_title,
            "signature_certificate": item.signature_certificate.hex(),
            "key_agreement_certificate": item.key_agreement_certificate.hex(),
            "created_at": item.created_at.isoformat()}
    return "certificate_import", {"order_id": item.order_id, "meter_serial": item.meter_serial,
                                  "status": item.status,
                                  "reported_at": item.reported_at.isoformat()}


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True)


def order_line(order: KeyOrder) -> str:
    """Return one order as a JSON line (without the newline)."""
    return _dumps(_doc(order)[1])


def outcome_line(outcome: Outcome) -> str:
    """Return one outcome as a JSON line (without the newline)."""
    return _dumps(_doc(outcome)[1])


def meter_line(meter: MeterRef) -> str:
    """Return a certificate-request ask for one meter as a JSON line."""
    return _dumps(_doc(meter)[1])


def csr_line(serial: str, signature: bytes, key_agreement: bytes) -> str:
    """Return one meter's two certificate requests (DER, hex) as a JSON line."""
    return _dumps(_doc(CsrAnswer(serial, signature, key_agreement))[1])


def certificate_order_line(order: CertificateOrder) -> str:
    """Return one certificate order as a JSON line (certificates as hex DER)."""
    return _dumps(_doc(order)[1])


def typed_line(item: Line) -> str:
    """Return any line with its kind in a ``type`` field (the command line's one-file form)."""
    kind, doc = _doc(item)
    return _dumps({TYPE: kind, **doc})


def encode_lines(lines: Iterable[str]) -> str:
    """Join JSON lines, one per line, newline-terminated."""
    return "".join(f"{line}\n" for line in lines)


# --- decoding: each kind's fields, already checked against FIELDS -----------------------------
def _order(doc: dict[str, Any], where: str) -> KeyOrder:
    return KeyOrder(_order_id(doc, where), _text(doc, "meter_serial", where),
                    _title(doc, where), _suite(doc, where),
                    _hex(doc["key_data"], where, "key_data"),
                    _hex(doc["challenge"], where, "challenge"),
                    _time(doc["created_at"], where, "created_at"))


def _outcome(doc: dict[str, Any], where: str) -> Outcome:
    if doc["status"] not in STATUSES:
        raise PortError(where, f"status {doc['status']!r} is not one of {', '.join(STATUSES)}")
    proof = None if doc["proof_apdu"] is None else _hex(doc["proof_apdu"], where, "proof_apdu")
    return Outcome(_order_id(doc, where), _text(doc, "meter_serial", where),
                   doc["status"], proof, _time(doc["reported_at"], where, "reported_at"))


def _meter(doc: dict[str, Any], where: str) -> MeterRef:
    return MeterRef(_text(doc, "meter_serial", where), _title(doc, where), _suite(doc, where))


def _csrs(doc: dict[str, Any], where: str) -> CsrAnswer:
    answer = CsrAnswer(_text(doc, "meter_serial", where),
                       _hex(doc["signature_csr"], where, "signature_csr"),
                       _hex(doc["key_agreement_csr"], where, "key_agreement_csr"))
    if not answer.signature_csr or not answer.key_agreement_csr:
        raise PortError(where, "a certificate request is empty")
    return answer


def _certificate_order(doc: dict[str, Any], where: str) -> CertificateOrder:
    return CertificateOrder(
        _order_id(doc, where), _text(doc, "meter_serial", where), _title(doc, where),
        _hex(doc["signature_certificate"], where, "signature_certificate"),
        _hex(doc["key_agreement_certificate"], where, "key_agreement_certificate"),
        _time(doc["created_at"], where, "created_at"))


def _import(doc: dict[str, Any], where: str) -> CertificateImport:
    if doc["status"] not in IMPORT_STATUSES:
        raise PortError(where, f"status {doc['status']!r} is not one of "
                               f"{', '.join(IMPORT_STATUSES)}")
    return CertificateImport(_order_id(doc, where), _text(doc, "meter_serial", where),
                             doc["status"], _time(doc["reported_at"], where, "reported_at"))


_DECODERS: dict[str, Callable[[dict[str, Any], str], Line]] = {
    "key_order": _order, "outcome": _outcome, "csr_ask": _meter, "csrs": _csrs,
    "certificate_order": _certificate_order, "certificate_import": _import}


def parse_order(line: str, where: str) -> KeyOrder:
    """Parse one order line strictly.

    Raises:
        PortError: naming ``where`` and the field that is wrong.
    """
    return _order(_object(line, where, FIELDS["key_order"]), where)


def parse_outcome(line: str, where: str) -> Outcome:
    """Parse one outcome line strictly.

    Raises:
        PortError: naming ``where`` and the field that is wrong.
    """
    return _outcome(_object(line, where, FIELDS["outcome"]), where)


def parse_typed(line: str, where: str, kinds: Sequence[str]) -> Line:
    """Parse one line of the one-file form: its ``type`` must be one of ``kinds``.

    Raises:
        PortError: naming ``where`` and the field that is wrong.
    """
    doc = _json(line, where)
    kind = doc.pop(TYPE, None)
    if kind is None:
        raise PortError(where, f"missing field {TYPE}")
    if not isinstance(kind, str) or kind not in kinds:
        raise PortError(where, f"{TYPE} is not one of {', '.join(kinds)}")
    return _DECODERS[kind](_fields(doc, where, FIELDS[kind]), where)


def decode_orders(text: str, name: str) -> list[KeyOrder]:
    """Parse a JSON lines text of orders; ``name`` (a file) goes into every error.

    Raises:
        PortError: at the first bad line, or an order id twice.
    """
    orders = [parse_order(line, where) for where, line in _lines(text, name)]
    _unique([o.order_id for o in orders], name)
    return orders


def decode_outcomes(text: str, name: str) -> list[Outcome]:
    """Parse a JSON lines text of outcomes; ``name`` (a file) goes into every error.

    Raises:
        PortError: at the first bad line, or an order id twice.
    """
    outcomes = [parse_outcome(line, where) for where, line in _lines(text, name)]
    _unique([o.order_id for o in outcomes], name)
    return outcomes


def decode_meters(text: str, name: str) -> list[MeterRef]:
    """Parse a JSON lines text of certificate-request asks (``meter_line``).

    Raises:
        PortError: at the first bad line.
    """
    return [_meter(_object(line, where, FIELDS["csr_ask"]), where)
            for where, line in _lines(text, name)]


def decode_csrs(text: str, name: str) -> CertificateRequests:
    """Parse a JSON lines text of certificate requests; ``name`` (a file) goes into every error.

    Raises:
        PortError: at the first bad line (missing or unknown field, wrong type, bad hex, empty
            request), or a meter twice.
    """
    out: CertificateRequests = {}
    for where, line in _lines(text, name):
        answer = _csrs(_object(line, where, FIELDS["csrs"]), where)
        if answer.meter_serial in out:
            raise PortError(where, f"meter {answer.meter_serial!r} appears twice")
        out[answer.meter_serial] = (answer.signature_csr, answer.key_agreement_csr)
    return out


def read_typed(text: str, name: str, kinds: Sequence[str]) -> tuple[list[Line], list[PortError]]:
    """Parse the one-file form leniently: return the good lines, and an error for each bad one
    (a line of a kind not in ``kinds``, a malformed line, or the same order or meter twice: the
    first stands)."""
    items: list[Line] = []
    errors: list[PortError] = []
    seen: set[tuple[str, str]] = set()
    for where, line in _lines(text, name):
        try:
            item = parse_typed(line, where, kinds)
            key = _identity(item)
            if key in seen:
                raise PortError(where, f"{key[0]} {key[1]!r} appears twice")
        except PortError as exc:
            errors.append(exc)
            continue
        seen.add(key)
        items.append(item)
    return items, errors


@dataclass(frozen=True)
class Answers:
    """A HES's answer file, sorted by kind; ``rejected`` names each bad line."""

    outcomes: list[Outcome]
    csrs: CertificateRequests
    imports: list[CertificateImport]
    rejected: list[PortError]


def read_answers(text: str, name: str) -> Answers:
    """Parse a HES's answer file (``outcome``, ``csrs`` and ``certificate_import`` lines),
    keeping the good lines and naming the bad ones."""
    items, rejected = read_typed(text, name, ANSWER_KINDS)
    return Answers([i for i in items if isinstance(i, Outcome)],
                   {i.meter_serial: (i.signature_csr, i.key_agreement_csr)
                    for i in items if isinstance(i, CsrAnswer)},
                   [i for i in items if isinstance(i, CertificateImport)], rejected)


def _identity(item: Line) -> tuple[str, str]:
    """What a line is about: an order by id, a meter by serial (one line each per file)."""
    kind, doc = _doc(item)
    return kind, str(doc.get("order_id") or doc["meter_serial"])


def _lines(text: str, name: str) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield f"{name} line {number}", line


def _unique(ids: Sequence[str], name: str) -> None:
    seen: set[str] = set()
    for order_id in ids:
        if order_id in seen:
            raise PortError(name, f"order {order_id!r} appears twice")
        seen.add(order_id)


def _object(line: str, where: str, fields: dict[str, Any]) -> dict[str, Any]:
    return _fields(_json(line, where), where, fields)


def _json(line: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PortError(where, f"not JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise PortError(where, "not a JSON object")
    return doc


def _fields(doc: dict[str, Any], where: str, fields: dict[str, Any]) -> dict[str, Any]:
    if missing := sorted(set(fields) - set(doc)):
        raise PortError(where, f"missing field {', '.join(missing)}")
    if unknown := sorted(set(doc) - set(fields)):
        raise PortError(where, f"unknown field {', '.join(unknown)}")
    for name, kind in fields.items():
        if not isinstance(doc[name], kind) or isinstance(doc[name], bool):
            raise PortError(where, f"{name} has the wrong type ({type(doc[name]).__name__})")
    return doc


def _order_id(doc: dict[str, Any], where: str) -> str:
    # An id is one meterkeys made (``CO-``/``CC-`` and 16 hex digits) echoed by the HES. A run
    # of 32 hex digits is refused here, before it reaches the audit trail (which refuses such
    # runs as possible key material, and would fail the whole file).
    value = _text(doc, "order_id", where)
    if len(value) > ORDER_ID_MAX or HEX_RUN.search(value):
        raise PortError(where, f"order_id is longer than {ORDER_ID_MAX} characters or holds 32 "
                               "hex digits in a row")
    return value


def _text(doc: dict[str, Any], field: str, where: str) -> str:
    value = str(doc[field])
    if not value or len(value) > 128 or not value.isprintable():
        raise PortError(where, f"{field} is empty, too long or not printable")
    return value


def _title(doc: dict[str, Any], where: str) -> str:
    title = str(doc["system_title"])
    if len(title) != SYSTEM_TITLE_HEX or title != title.upper():
        raise PortError(where, "system_title is not 16 upper-case hex digits")
    _hex(title, where, "system_title")
    return title


def _suite(doc: dict[str, Any], where: str) -> int:
    if doc["suite"] not in (0, 1, 2) or isinstance(doc["suite"], bool):
        raise PortError(where, f"suite {doc['suite']!r} is not 0, 1 or 2")
    return int(doc["suite"])


def _hex(value: str, where: str, field: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise PortError(where, f"{field} is not hex") from None


def _time(value: str, where: str, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PortError(where, f"{field} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise PortError(where, f"{field} has no time zone")
    return moment
