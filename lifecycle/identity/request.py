"""Signed requests, pure: canonical form, parameter digests, strict encoding.

A request's message is the canonical JSON (``json.dumps(..., sort_keys=True,
separators=(",", ":"), ensure_ascii=True, allow_nan=False)``, ASCII) of ``purpose``
(``meterkeys-request/1``), ``installation``, ``action``, ``params_digest``, ``principal``,
``nonce`` and ``time`` (ISO 8601 in UTC with microseconds). The purpose keeps a principal's
signature on a request from meaning anything else; the installation keeps a request made for
one inventory from being accepted by another.

Digests, fingerprints and signatures are base64url without padding, never hex: the audit
trail refuses runs of 32 or more hex digits (``lifecycle.audit.chain``), and requests are
recorded in it.

Nothing here reads a database, a file or an HSM.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from lifecycle.errors import RequestError

PURPOSE = "meterkeys-request/1"
MAX_TEXT = 64 * 1024
MAX_REQUESTS = 8
FIELDS = ("action", "params_digest", "principal", "nonce", "time", "installation", "signature")

_DIGEST = re.compile(r"sha256:[A-Za-z0-9_-]{43}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_ACTION = re.compile(r"[a-z][a-z0-9.-]{0,63}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_LIMITS = {"principal": 128, "installation": 64, "signature": 256}


class Signer(Protocol):
    """Whoever holds a principal's private key: gives its public key, signs a message."""

    def public_key_pem(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


def canonical(value: Any) -> str:
    """Return the canonical JSON text of a value (sorted keys, no spaces, ASCII, no NaN).

    Raises:
        ValueError: the value is not JSON data (or holds NaN or infinity).
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
    except TypeError as exc:
        raise ValueError(f"not JSON data: {exc}") from None


def b64url(data: bytes) -> str:
    """Return base64url of ``data`` without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str, where: str) -> bytes:
    """Decode base64url without padding.

    Raises:
        RequestError: not base64url (naming ``where``).
    """
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise RequestError(where, "not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise RequestError(where, "not base64url") from None


def params_digest(params: Mapping[str, Any]) -> str:
    """Return ``sha256:`` and the base64url SHA-256 of the parameters' canonical JSON.

    Raises:
        ValueError: the parameters are not JSON data (a programming error).
    """
    text = canonical(dict(params))
    return "sha256:" + b64url(hashlib.sha256(text.encode("ascii")).digest())


def iso(at: datetime) -> str:
    """Return a time as ISO 8601 in UTC with microseconds.

    Raises:
        ValueError: the time is naive.
    """
    if at.utcoffset() is None:
        raise ValueError("a request time must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Request:
    """What a principal signs: one action on one digest of parameters, once, at a time."""

    action: str
    params_digest: str
    principal: str
    nonce: str
    time: datetime
    installation: str

    def message(self) -> bytes:
        """Return the canonical bytes that are signed (see the module docstring)."""
        return canonical({
            "purpose": PURPOSE, "installation": self.installation, "action": self.action,
            "params_digest": self.params_digest, "principal": self.principal,
            "nonce": self.nonce, "time": iso(self.time),
        }).encode("ascii")


@dataclass(frozen=True)
class SignedRequest:
    """A request and its signature (base64url of the signature bytes)."""

    request: Request
    signature: str

    def to_dict(self) -> dict[str, str]:
        """Return the flat mapping that ``from_dict`` reads back."""
        r = self.request
        return {"action": r.action, "params_digest": r.params_digest, "principal": r.principal,
                "nonce": r.nonce, "time": iso(r.time), "installation": r.installation,
                "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Any, where: str = "request") -> SignedRequest:
        """Read a signed request strictly: exactly its fields, each of its form.

        Raises:
            RequestError: naming the field that is missing, unknown or malformed.
        """
        if not isinstance(data, dict):
            raise RequestError(where, "not a JSON object")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise RequestError(f"{where} field {unknown[0]!r}", "unknown field")
        for name in FIELDS:
            _check_field(data, name, where)
        request = Request(data["action"], data["params_digest"], data["principal"],
                          data["nonce"], _time(data["time"], f"{where} field 'time'"),
                          data["installation"])
        return cls(request, data["signature"])


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("a field appears twice")
    return dict(pairs)


def _check_field(data: dict[str, Any], name: str, where: str) -> None:
    at = f"{where} field {name!r}"
    if name not in data:
        raise RequestError(at, "missing")
    value = data[name]
    if not isinstance(value, str) or not value:
        raise RequestError(at, "not a non-empty string")
    if len(value) > _LIMITS.get(name, 64) or not value.isascii() or not value.isprintable():
        raise RequestError(at, "too long, or not printable ASCII")
    if name == "action" and not _ACTION.fullmatch(value):
        raise RequestError(at, "not an action name")
    if name == "params_digest" and not _DIGEST.fullmatch(value):
        raise RequestError(at, "not sha256: and 43 base64url characters")
    if name == "nonce" and not _NONCE.fullmatch(value):
        raise RequestError(at, "not 16 to 64 base64url characters")
    if name == "principal" and value != value.strip():
        raise RequestError(at, "has surrounding spaces")
    if name == "signature":
        unb64url(value, at)


def _time(text: str, where: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise RequestError(where, "not ISO 8601") from None
    if at.utcoffset() is None:
        raise RequestError(where, "has no time zone")
    return at.astimezone(UTC)


def make(action: str, params: Mapping[str, Any], principal: str, installation: str,
         at: datetime, signer: Signer, nonce: str | None = None) -> SignedRequest:
    """Sign a request for ``action`` on ``params`` as ``principal`` with ``signer``.

    Raises:
        ValueError: ``at`` is naive, or the parameters are not JSON data.
        ConfigError, HsmError: the signer could not sign.
    """
    iso(at)  # refuses a naive time before it is read as local time
    request = Request(action, params_digest(params), principal,
                      nonce or secrets.token_urlsafe(16), at.astimezone(UTC), installation)
    return SignedRequest(request, b64url(signer.sign(request.message())))


def encode(requests: Sequence[SignedRequest]) -> str:
    """Return signed requests as JSON array text (a flow parameter, a database column)."""
    return canonical([r.to_dict() for r in requests])


def decode(text: str) -> list[SignedRequest]:
    """Read what ``encode`` wrote, strictly: at most 64 KiB, one to eight requests.

    Raises:
        RequestError: naming the request and field that is malformed.
    """
    if not isinstance(text, str):
        raise RequestError("requests", "not text")
    if len(text) > MAX_TEXT:
        raise RequestError("requests", f"longer than {MAX_TEXT} characters")
    try:
        data = json.loads(text, object_pairs_hook=_unique)
    except ValueError as exc:
        raise RequestError("requests", f"not JSON ({exc})") from None
    if not isinstance(data, list):
        raise RequestError("requests", "not a JSON array")
    if not 1 <= len(data) <= MAX_REQUESTS:
        raise RequestError("requests", f"holds {len(data)} requests; 1 to {MAX_REQUESTS} allowed")
    return [SignedRequest.from_dict(item, f"request {index}")
            for index, item in enumerate(data, start=1)]
