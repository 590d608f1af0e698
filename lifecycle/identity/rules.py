"""The identity decisions, pure: is a request for this, fresh, enough; does an enrolment hold.

``lifecycle.principals`` gathers the rows, the anchor and the clock and calls these; nothing
here reads a database, a file or an HSM. Each check raises ``RequestError`` naming the request
or principal and the reason, never returns a verdict to be ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from lifecycle.errors import RequestError
from lifecycle.identity import keys, request
from lifecycle.identity.anchor import Anchor
from lifecycle.identity.request import SignedRequest

ENROL = "principal.enrol"
SECURITY_OFFICER = "security-officer"
FUTURE_SKEW = timedelta(seconds=60)
MAX_DEPTH = 16


@dataclass(frozen=True)
class Record:
    """A principal row as stored, none of it trusted: what ``verify_enrolment`` checks."""

    name: str
    role: str
    public_pem: str | None
    fingerprint: str | None
    enrolment: str | None
    disabled: bool = False


def by(signed: SignedRequest) -> str:
    """Name a request by its claimed signer, for messages."""
    return f"request by {signed.request.principal!r}"


def enrolment_params(name: str, role: str, public_pem: str) -> dict[str, str]:
    """Return the parameters an enrolment signs (``public_pem`` already normalised)."""
    return {"name": name, "role": role, "public_pem": public_pem}


def check_matches(requests: Sequence[SignedRequest], action: str, digest: str,
                  installation: str) -> None:
    """Check every request is for this action, these parameters and this installation, and
    that no principal signed twice and no nonce appears twice.

    Raises:
        RequestError: no request, or the first request that differs, and how.
    """
    if not requests:
        raise RequestError("request", "no signed request", action=action)
    seen: set[str] = set()
    nonces: set[str] = set()
    for signed in requests:
        r = signed.request
        where = by(signed)
        if r.action != action:
            raise RequestError(where, f"signed for {r.action!r}, not {action!r}",
                               principal=r.principal, action=action)
        if r.params_digest != digest:
            raise RequestError(where, "the parameters differ from what was signed",
                               principal=r.principal, action=action)
        if r.installation != installation:
            raise RequestError(where, f"signed for installation {r.installation}, not this "
                                      f"one ({installation})", principal=r.principal,
                               action=action)
        if r.principal in seen:
            raise RequestError(where, "the same principal signed twice",
                               principal=r.principal, action=action)
        if r.nonce in nonces:
            raise RequestError(where, "two requests carry the same nonce",
                               principal=r.principal, action=action)
        seen.add(r.principal)
        nonces.add(r.nonce)


def check_fresh(requests: Sequence[SignedRequest], at: datetime, max_age: int,
                window: int) -> None:
    """Check the newest signature is at most ``max_age`` seconds old, every one at most
    ``window`` seconds old, and none more than a minute ahead of ``at``.

    Raises:
        RequestError: naming the stale or future request.
    """
    for signed in requests:
        if signed.request.time > at + FUTURE_SKEW:
            raise RequestError(by(signed), f"signed at {request.iso(signed.request.time)}, "
                                           "in the future", principal=signed.request.principal)
        if at - signed.request.time > timedelta(seconds=window):
            raise RequestError(by(signed), f"signed at {request.iso(signed.request.time)}, "
                                           f"more than {window} s ago",
                               principal=signed.request.principal)
    newest = max(requests, key=lambda s: s.request.time)
    if at - newest.request.time > timedelta(seconds=max_age):
        raise RequestError(by(newest), f"signed at {request.iso(newest.request.time)}, more "
                                       f"than {max_age} s ago (stale)",
                           principal=newest.request.principal)


def check_dual_control(roles: dict[str, str], action: str, *, single_ok: bool = False) -> None:
    """Check at least two distinct security officers signed (``roles``: signer -> role).

    ``single_ok``: the one exception, the root enrolling the anchored second officer.

    Raises:
        RequestError: fewer than two security officers signed.
    """
    officers = sorted(n for n, role in roles.items() if role == SECURITY_OFFICER)
    if len(officers) >= 2 or (single_ok and len(officers) == 1):
        return
    raise RequestError("dual control", f"{action!r} needs two distinct security officers; "
                                       f"signed by {', '.join(officers) or 'none'}",
                       principal=next(iter(roles), ""), action=action)


def verify_signature(signed: SignedRequest, public_pem: str) -> None:
    """Check a request's signature under a public key.

    Raises:
        RequestError: the signature does not verify.
    """
    try:
        keys.verify(public_pem, signed.signature, signed.request.message())
    except RequestError:
        raise RequestError(by(signed), "the signature does not verify under the principal's "
                                       "enrolled key", principal=signed.request.principal,
                           action=signed.request.action) from None


# --- enrolment chains ----------------------------------------------------------------------------
Lookup = Callable[[str], Record | None]


class _Chain:
    """One verification: rows by name, the anchor, the installation, a cache and a stack."""

    def __init__(self, lookup: Lookup, anchor: Anchor | None, installation: str) -> None:
        self.lookup = lookup
        self.anchor = anchor
        self.installation = installation
        self.done: dict[str, Record] = {}
        self.active: list[str] = []

    def verify(self, name: str) -> Record:
        if name in self.done:
            return self.done[name]
        if name in self.active:
            raise _Broken(f"enrolment cycle through {name!r}")
        if len(self.active) >= MAX_DEPTH:
            raise _Broken(f"enrolment chain deeper than {MAX_DEPTH}")
        self.active.append(name)
        try:
            record = self._check(name)
        finally:
            self.active.pop()
        self.done[name] = record
        return record

    def _check(self, name: str) -> Record:
        record = self.lookup(name)
        if record is None:
            raise _Broken(f"no principal {name!r}")
        pem, requests = _own_facts(record)
        digest = request.params_digest(enrolment_params(record.name, record.role, pem))
        try:
            check_matches(requests, ENROL, digest, self.installation)
        except RequestError as exc:
            raise _Broken(str(exc)) from None
        signers = [s.request.principal for s in requests]
        if self._is_root(record, signers):
            _verify(requests[0], pem)
            return record
        if record.name in signers:
            raise _Broken("signed by itself; only the anchored root is")
        for signed in requests:
            signer = self.verify(signed.request.principal)
            if signer.role != SECURITY_OFFICER:
                raise _Broken(f"signer {signer.name!r} is not a security officer")
            _verify(signed, str(signer.public_pem))
        if len(signers) >= 2 or self._is_second(record, signers):
            return record
        raise _Broken(f"signed by {', '.join(signers)} alone; two security officers are "
                      "needed (or the root, for the anchored second officer)")

    def _is_root(self, record: Record, signers: list[str]) -> bool:
        a = self.anchor
        if a is None:
            raise _Broken("no principal anchor (principals.anchor in the witness folder)")
        if a.installation != self.installation:
            raise _Broken(f"the anchor belongs to installation {a.installation}")
        if record.name != a.root:
            return False
        if (record.fingerprint, record.role, signers) != (a.root_fingerprint, SECURITY_OFFICER,
                                                          [a.root]):
            raise _Broken("the root's row is not the anchored, self-signed security officer")
        return True

    def _is_second(self, record: Record, signers: list[str]) -> bool:
        a = self.anchor
        assert a is not None
        return (a.second is not None and record.name == a.second
                and record.fingerprint == a.second_fingerprint
                and record.role == SECURITY_OFFICER and signers == [a.root])


class _Broken(Exception):
    """An enrolment chain does not hold (internal; reported as RequestError)."""


def _own_facts(record: Record) -> tuple[str, list[SignedRequest]]:
    if not record.public_pem or not record.fingerprint or not record.enrolment:
        raise _Broken("no key or no enrolment")
    try:
        if keys.fingerprint(record.public_pem) != record.fingerprint:
            raise _Broken("the fingerprint is not the key's")
        pem = keys.normalize_pem(record.public_pem, "public_pem")
        requests = request.decode(record.enrolment)
    except RequestError as exc:
        raise _Broken(str(exc)) from None
    return pem, requests


def _verify(signed: SignedRequest, pem: str) -> None:
    try:
        verify_signature(signed, pem)
    except RequestError as exc:
        raise _Broken(str(exc)) from None


def verify_enrolment(name: str, lookup: Lookup, anchor: Anchor | None,
                     installation: str, cache: dict[str, Record] | None = None) -> Record:
    """Verify a principal's enrolment from the rows alone, back to the anchor; return its row.

    The enrolment must be for ``principal.enrol`` on the row's own name, role and key, in this
    installation, signed by two distinct security officers each verified the same way; or be
    the anchored root's, self-signed; or the anchored second officer's, signed by the root.
    ``cache`` (name -> verified row) may be shared by calls over the same rows.

    Raises:
        RequestError: ``principal X: enrolment does not verify (why)``.
    """
    chain = _Chain(lookup, anchor, installation)
    if cache is not None:
        chain.done = cache
    try:
        return chain.verify(name)
    except _Broken as exc:
        raise RequestError(f"principal {name!r}", f"enrolment does not verify ({exc})",
                           principal=name) from None
