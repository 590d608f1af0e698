"""Pending dual-control requests: two security officers sign one action at different times.

The first officer's signed request is stored with its parameters (``submit``), checked as
``principals.authorize`` would check it (signer, role, signature, freshness) but with its nonce
left unconsumed; the second officer adds a signature over the stored parameters (``complete``),
and both are accepted together: nonces consumed, dual control checked, the row marked done, in
one transaction. No server is needed: the inventory holds the request between the two.
Enrolling and disabling a principal are performed here, in that transaction; every other action
is performed by the caller once ``complete`` returns who acts.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from lifecycle import principals
from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import InventoryError, ReplayedRequest, RequestError
from lifecycle.identity import request, rules
from lifecycle.identity.request import SignedRequest
from lifecycle.inventory import requests as pending_table
from lifecycle.inventory.db import Engine, Session, transaction


@dataclass(frozen=True)
class Pending:
    """A dual-control request waiting for (or given) its second signature."""

    id: str
    action: str
    params: dict[str, Any]
    requests: list[SignedRequest]
    created_at: datetime
    status: str  # pending | done | refused


def submit(engine: Engine, settings: Settings, signed: SignedRequest, action: str,
           params: Mapping[str, Any], *, at: datetime) -> str:
    """Store a dual-control request with its first signature; return its id (``R-`` and eight
    base32 characters).

    The signature is checked as ``authorize`` would (signer, role, signature, freshness) but
    its nonce is not consumed: ``complete`` consumes both. Audited as ``request.pending``.

    Raises:
        AccessDenied: the request would be refused (audited).
        ValueError: the action is unknown or not under dual control, or enrolment parameters
            that are not ``principals.enrolment_params``'s.
    """
    principals.check_known(action)
    if action not in principals.DUAL_CONTROL:
        raise ValueError(f"{action!r} is not under dual control: authorize it directly")
    _check_action_params(action, params)
    return principals.guarded(
        engine, [signed], action, at, None,
        lambda session: _submit(session, settings, signed, action, params, at))


def _submit(session: Session, settings: Settings, signed: SignedRequest, action: str,
            params: Mapping[str, Any], at: datetime) -> str:
    digest = principals.checked(session, settings, [signed], action, params, at)
    roles = principals.check_signers(session, settings, [signed], action)
    if pending_table.used_nonces(session, [signed.request.nonce]):
        raise ReplayedRequest(rules.by(signed), "nonce already used (replay)",
                              principal=signed.request.principal, action=action)
    request_id = "R-" + base64.b32encode(secrets.token_bytes(5)).decode("ascii")
    pending_table.insert_pending(session, request_id, action, request.canonical(dict(params)),
                                 request.encode([signed]), at)
    name = signed.request.principal
    trail.record(session, Actor(name, roles[name]), principals.PENDING_EVENT, "ok", detail={
        "action": action, "params_digest": digest, "request_id": request_id, "signer": name},
        at=at)
    return request_id


def _check_action_params(action: str, params: Mapping[str, Any]) -> None:
    # A pending enrolment or disabling is performed by ``complete``: its parameters must be
    # exactly what ``enrol`` and ``disable`` sign.
    if action == principals.ENROL:
        if set(params) != {"name", "role", "public_pem"} or \
                dict(params) != principals.enrolment_params(params["name"], params["role"],
                                                            params["public_pem"]):
            raise ValueError("enrolment parameters must be enrolment_params(name, role, pem)")
    elif action == principals.DISABLE and set(params) != {"name"}:
        raise ValueError("disabling parameters must be {'name': name}")


def get_pending(engine: Engine, request_id: str) -> Pending:
    """Return a pending (or finished) dual-control request.

    Raises:
        InventoryError: no request with that id, or its stored parameters or requests are
            malformed (naming the id).
    """
    with transaction(engine) as session:
        return _pending(pending_table.get_pending(session, request_id))


def _pending(row: pending_table.PendingRequest) -> Pending:
    try:
        params = json.loads(row.params)
        requests = request.decode(row.requests)
    except (ValueError, RequestError) as exc:
        raise InventoryError(f"pending request {row.id}: malformed ({exc})") from None
    if not isinstance(params, dict):
        raise InventoryError(f"pending request {row.id}: parameters are not an object")
    return Pending(row.id, row.action, params, requests, row.created_at, row.status)


def complete(engine: Engine, settings: Settings, request_id: str, second: SignedRequest, *,
             at: datetime, flow_run_id: str | None = None) -> tuple[Actor, Pending]:
    """Add a second security officer's signature to a pending request and authorize both.

    The parameters are re-hashed from what is stored, so an edited row is refused (the
    parameters differ from what was signed). Both nonces are consumed and the row marked done
    in one transaction; a refusal leaves it pending. The caller then performs the action;
    ``principal.enrol`` and ``principal.disable`` are performed here, in that transaction.

    Raises:
        AccessDenied: the same principal signed twice, or see ``authorize`` (audited).
        InventoryError: no such request, or it is not pending.
    """
    action = get_pending(engine, request_id).action
    principals.check_known(action)

    def work(session: Session) -> tuple[Actor, Pending]:
        pending = _pending(pending_table.get_pending(session, request_id, for_update=True))
        if pending.status != pending_table.PENDING:
            raise InventoryError(f"request {request_id} is {pending.status}, not pending")
        if second.request.principal in {s.request.principal for s in pending.requests}:
            raise RequestError(rules.by(second), "signed this pending request already; a "
                                                 "second security officer must complete it",
                               principal=second.request.principal, action=action)
        requests = [*pending.requests, second]
        actor = principals.accept(session, settings, requests, action, pending.params, at,
                                  flow_run_id)
        _perform(session, settings, requests, action, pending.params, actor, at)
        pending_table.finish_pending(session, request_id, request.encode(requests),
                                     pending_table.DONE)
        return actor, replace(pending, requests=requests, status=pending_table.DONE)

    return principals.guarded(engine, [second], action, at, flow_run_id, work)


def _perform(session: Session, settings: Settings, requests: Sequence[SignedRequest],
             action: str, params: Mapping[str, Any], actor: Actor, at: datetime) -> None:
    if action == principals.ENROL:
        _check_action_params(action, params)
        principals.enrol_in(session, settings, requests, params, actor, at, second=False)
    elif action == principals.DISABLE:
        principals.disable_in(session, requests, str(params["name"]), actor, at)
