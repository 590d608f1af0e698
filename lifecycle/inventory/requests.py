"""Signed requests in the inventory: the nonces used, and dual-control requests pending.

A nonce row is inserted in the transaction that accepts its request and records the audit
event ``request.accepted``, so a request is accepted once (the primary key backs the check
``lifecycle.principals`` makes under the audit head's lock). A pending request waits for a
second security officer's signature (``lifecycle.pending_requests.submit`` / ``complete``); its
parameters are re-hashed at completion, so editing them here is caught.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text, select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.clock import utcnow
from lifecycle.errors import InventoryError

PENDING, DONE, REFUSED = "pending", "done", "refused"


class RequestNonce(SQLModel, table=True):
    __tablename__ = "request_nonce"
    nonce: str = Field(primary_key=True, max_length=64)
    principal: str = Field(max_length=128)
    action: str = Field(max_length=64)
    used_at: datetime = Field(default_factory=utcnow)


class PendingRequest(SQLModel, table=True):
    __tablename__ = "pending_request"
    id: str = Field(primary_key=True, max_length=16)
    action: str = Field(max_length=64)
    params: str = Field(sa_column=Column(Text, nullable=False))
    requests: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    status: str = Field(default=PENDING, max_length=16)


def used_nonces(session: Session, nonces: list[str]) -> list[str]:
    """Return which of the nonces were used before."""
    if not nonces:
        return []
    return sorted(session.execute(select(col(RequestNonce.nonce)).where(
        col(RequestNonce.nonce).in_(nonces))).scalars())


def use_nonces(session: Session, used: list[tuple[str, str, str]], at: datetime) -> None:
    """Record nonces as used: (nonce, principal, action) each, inside the caller's transaction.

    Raises:
        InventoryError: a nonce was used before (checked first; the primary key backs it).
    """
    again = used_nonces(session, [nonce for nonce, _, _ in used])
    if again:
        raise InventoryError(f"request nonce {again[0]} was used before")
    session.add_all([RequestNonce(nonce=nonce, principal=principal, action=action, used_at=at)
                     for nonce, principal, action in used])
    session.flush()


def insert_pending(session: Session, request_id: str, action: str, params: str, requests: str,
                   at: datetime) -> PendingRequest:
    """Store a pending request inside the caller's transaction."""
    row = PendingRequest(id=request_id, action=action, params=params, requests=requests,
                         created_at=at, status=PENDING)
    session.add(row)
    session.flush()
    return row


def get_pending(session: Session, request_id: str, *, for_update: bool = False) -> PendingRequest:
    """Return a pending request by id (locked for this transaction when ``for_update``).

    Raises:
        InventoryError: no request with that id.
    """
    stmt = select(PendingRequest).where(col(PendingRequest.id) == request_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = session.execute(stmt).scalars().first()
    if row is None:
        raise InventoryError(f"no pending request {request_id!r}")
    return row


def finish_pending(session: Session, request_id: str, requests: str, status: str) -> None:
    """Mark a pending request done or refused, with every signature it gathered.

    Raises:
        InventoryError: no such request, or it is not pending.
    """
    row = get_pending(session, request_id, for_update=True)
    if row.status != PENDING:
        raise InventoryError(f"request {request_id} is {row.status}, not pending")
    row.status = status
    row.requests = requests
    session.add(row)
    session.flush()
