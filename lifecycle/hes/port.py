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
file and line named (``PortError``, under the project's error root).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, get_args

from lifecycle.errors import PortError

Status = Literal["ok", "not_ok", "failed", "timeout"]
STATUSES: tuple[str, ...] = get_args(Status)
SYSTEM_TITLE_HEX = 16



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


_ORDER_FIELDS = {"order_id": str, "meter_serial": str, "system_title": str, "suite": int,
                 "key_data": str, "challenge": str, "created_at": str}
_CSR_FIELDS = {"meter_serial": str, "signature_csr": str, "key_agreement_csr": str}
_OUTCOME_FIELDS = {"order_id": str, "meter_serial": str, "status": str,
                   "proof_apdu": (str, type(None)), "reported_at": str}


def order_line(order: KeyOrder) -> str:
    """Return one order as a JSON line (without the newline)."""
    return json.dumps({"order_id": order.order_id, "meter_serial": order.meter_serial,
                       "system_title": order.system_title, "suite": order.suite,
                       "key_data": order.key_data.hex(), "challenge": order.challenge.hex(),
                       "created_at": order.created_at.isoformat()}, sort_keys=True)


def outcome_line(outcome: Outcome) -> str:
    """Return one outcome as a JSON line (without the newline)."""
    proof = None if outcome.proof_apdu is None else outcome.proof_apdu.hex()
    return json.dumps({"order_id": outcome.order_id, "meter_serial": outcome.meter_serial,
                       "status": outcome.status, "proof_apdu": proof,
                       "reported_at": outcome.reported_at.isoformat()}, sort_keys=True)


def meter_line(meter: MeterRef) -> str:
    """Return a certificate-request ask for one meter as a JSON line."""
    return json.dumps({"meter_serial": meter.serial, "system_title": meter.system_title,
                       "suite": meter.suite}, sort_keys=True)


def csr_line(serial: str, signature: bytes, key_agreement: bytes) -> str:
    """Return one meter's two certificate requests (DER, hex) as a JSON line."""
    return json.dumps({"meter_serial": serial, "signature_csr": signature.hex(),
                       "key_agreement_csr": key_agreement.hex()}, sort_keys=True)


def certificate_order_line(order: CertificateOrder) -> str:
    """Return one certificate order as a JSON line (certificates as hex DER)."""
    return json.dumps({"order_id": order.order_id, "meter_serial": order.meter_serial,
                       "system_title": order.system_title,
                       "signature_certificate": order.signature_certificate.hex(),
                       "key_agreement_certificate": order.key_agreement_certificate.hex(),
                       "created_at": order.created_at.isoformat()}, sort_keys=True)


def decode_csrs(text: str, name: str) -> CertificateRequests:
    """Parse a JSON lines text of certificate requests; ``name`` (a file) goes into every error.

    Raises:
        PortError: at the first bad line (missing or unknown field, wrong type, bad hex, empty
            request), or a meter twice.
    """
    out: CertificateRequests = {}
    for where, line in _lines(text, name):
        doc = _object(line, where, _CSR_FIELDS)
        serial = _text(doc, "meter_serial", where)
        if serial in out:
            raise PortError(where, f"meter {serial!r} appears twice")
        pair = (_hex(doc["signature_csr"], where, "signature_csr"),
                _hex(doc["key_agreement_csr"], where, "key_agreement_csr"))
        if not all(pair):
            raise PortError(where, "a certificate request is empty")
        out[serial] = pair
    return out


def parse_order(line: str, where: str) -> KeyOrder:
    """Parse one order line strictly.

    Raises:
        PortError: naming ``where`` and the field that is wrong.
    """
    doc = _object(line, where, _ORDER_FIELDS)
    title = doc["system_title"]
    if len(title) != SYSTEM_TITLE_HEX or title != title.upper():
        raise PortError(where, "system_title is not 16 upper-case hex digits")
    _hex(title, where, "system_title")
    if doc["suite"] not in (0, 1, 2) or isinstance(doc["suite"], bool):
        raise PortError(where, f"suite {doc['suite']!r} is not 0, 1 or 2")
    return KeyOrder(_text(doc, "order_id", where), _text(doc, "meter_serial", where), title,
                    doc["suite"], _hex(doc["key_data"], where, "key_data"),
                    _hex(doc["challenge"], where, "challenge"),
                    _time(doc["created_at"], where, "created_at"))


def parse_outcome(line: str, where: str) -> Outcome:
    """Parse one outcome line strictly.

    Raises:
        PortError: naming ``where`` and the field that is wrong.
    """
    doc = _object(line, where, _OUTCOME_FIELDS)
    if doc["status"] not in STATUSES:
        raise PortError(where, f"status {doc['status']!r} is not one of {', '.join(STATUSES)}")
    proof = None if doc["proof_apdu"] is None else _hex(doc["proof_apdu"], where, "proof_apdu")
    return Outcome(_text(doc, "order_id", where), _text(doc, "meter_serial", where),
                   doc["status"], proof, _time(doc["reported_at"], where, "reported_at"))


def encode_lines(lines: Iterable[str]) -> str:
    """Join JSON lines, one per line, newline-terminated."""
    return "".join(f"{line}\n" for line in lines)


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
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PortError(where, f"not JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise PortError(where, "not a JSON object")
    if missing := sorted(set(fields) - set(doc)):
        raise PortError(where, f"missing field {', '.join(missing)}")
    if unknown := sorted(set(doc) - set(fields)):
        raise PortError(where, f"unknown field {', '.join(unknown)}")
    for name, kind in fields.items():
        if not isinstance(doc[name], kind) or isinstance(doc[name], bool):
            raise PortError(where, f"{name} has the wrong type ({type(doc[name]).__name__})")
    return doc


def _text(doc: dict[str, Any], field: str, where: str) -> str:
    value = str(doc[field])
    if not value or len(value) > 128 or not value.isprintable():
        raise PortError(where, f"{field} is empty, too long or not printable")
    return value


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
