"""Principals and roles: who may perform which action, as one declarative table.

Roles:
    security-officer  holds the HSM (token PINs, backups), onboards vendors, manages principals.
    operator          runs the fleet's daily work: imports factory batches, reads meters,
                      signs audit checkpoints.
    auditor           reads: meters, the audit trail and the principals; verifies the trail and
                      the key blobs' bindings.

The security officer may perform every action, audit reading and verifying included. That is a
decision, not an oversight: the officer holds the token's PINs and may create principals of any
role, so refusing them an operator's or auditor's action would be theatre they can bypass by
enrolling a second name, and it would hide who really acted. Separation of duties rests instead
on what no role can do: no action alters or deletes audit events (the trail is append-only, its
head is signed in the HSM), every refusal is itself audited, and the auditor role is read-only so
that review does not need the officer (separation of duties, NIST SP 800-53 control AC-5).
Operators never touch the HSM's long-lived keys; auditors never change state.

Bootstrap: while the principal table is empty, ``enroll`` adds the first principal without a
role check (anyone who can reach the inventory could, at that point, bypass it anyway). It must be
a security officer, so that someone can manage principals afterwards, and it is audited as
``principal.bootstrap`` under the name of the operating-system user (or ``METERKEYS_PRINCIPAL``)
who ran it. The audit head is locked first, so two concurrent bootstraps cannot both succeed.

An action not in the table is a programming error and raises ``ValueError``; an unknown or
disabled principal is refused like any other (and the refusal audited).
"""

from __future__ import annotations

from datetime import datetime

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.errors import AccessDenied, InventoryError
from lifecycle.inventory import principals as table
from lifecycle.inventory.db import Engine, Session, transaction
from lifecycle.inventory.principals import Principal

SECURITY_OFFICER = "security-officer"
OPERATOR = "operator"
AUDITOR = "auditor"
ROLES = (SECURITY_OFFICER, OPERATOR, AUDITOR)

_SO = frozenset({SECURITY_OFFICER})
PERMISSIONS: dict[str, frozenset[str]] = {
    "hsm.init": _SO,
    "hsm.backup": _SO,
    "hsm.restore": _SO,
    "vendor.add": _SO,
    "vendor.import-key": _SO,
    "principal.manage": _SO,
    "batch.import": frozenset({SECURITY_OFFICER, OPERATOR}),
    "audit.checkpoint": frozenset({SECURITY_OFFICER, OPERATOR}),
    "meter.read": frozenset(ROLES),
    "audit.read": frozenset({SECURITY_OFFICER, AUDITOR}),
    "audit.verify": frozenset({SECURITY_OFFICER, AUDITOR}),
    "inventory.verify": frozenset({SECURITY_OFFICER, AUDITOR}),
    "principal.read": frozenset({SECURITY_OFFICER, AUDITOR}),
}


def may(role: str | None, action: str) -> bool:
    """Return whether a role may perform an action (no role may do nothing).

    Raises:
        ValueError: the action is not in the permission table.
    """
    if action not in PERMISSIONS:
        raise ValueError(f"unknown action {action!r}")
    return role in PERMISSIONS[action]


def add_principal(session: Session, name: str, role: str) -> Principal:
    """Add a principal with a role inside the caller's transaction.

    Raises:
        InventoryError: unknown role, empty name, or a principal of that name exists.
    """
    if role not in ROLES:
        raise InventoryError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    if not name or name != name.strip():
        raise InventoryError(f"principal name {name!r} is empty or has surrounding spaces")
    return table.insert_principal(session, name, role)


def role_of(session: Session, name: str) -> str | None:
    """Return the role of an enabled principal, or None when unknown or disabled."""
    return table.enabled_role(session, name)


def list_principals(session: Session) -> list[Principal]:
    """Return every principal by name."""
    return table.list_principals(session)


def authorize(engine: Engine, actor_name: str, action: str, *, flow_run_id: str | None = None,
              at: datetime) -> Actor:
    """Return the acting Actor when its role allows the action; otherwise audit and refuse.

    A refusal is recorded (outcome ``denied``) in its own committed transaction, so it is kept
    although the caller fails.

    Raises:
        AccessDenied: the principal is unknown, disabled, or its role may not perform the action.
        ValueError: the action is not in the permission table.
    """
    if action not in PERMISSIONS:
        raise ValueError(f"unknown action {action!r}")
    with transaction(engine) as session:
        role = role_of(session, actor_name)
        actor = Actor(actor_name, role, flow_run_id)
        allowed = may(role, action)
        if not allowed:
            reason = "unknown or disabled principal" if role is None else "role not permitted"
            trail.record(session, actor, action, "denied", detail={"reason": reason}, at=at)
    if not allowed:
        raise AccessDenied(actor_name, role, action)
    return actor


def enroll(engine: Engine, actor_name: str, name: str, role: str, *, at: datetime,
           flow_run_id: str | None = None) -> bool:
    """Add a principal on behalf of actor_name; return True if it was the bootstrap.

    The first principal is added without a role check and must be a security officer; every
    later one needs ``principal.manage``. Both are audited in the same transaction as the insert.

    Raises:
        AccessDenied: actor_name may not manage principals (the refusal is audited).
        InventoryError: unknown role, duplicate name, or a bootstrap principal that is not a
            security officer.
    """
    with transaction(engine) as session:
        trail.lock_head(session)  # serialises concurrent bootstraps (see module docstring)
        if table.count_principals(session) == 0:
            if role != SECURITY_OFFICER:
                raise InventoryError(
                    f"the first principal must be a {SECURITY_OFFICER}, not {role!r}")
            add_principal(session, name, role)
            trail.record(session, Actor(actor_name, None, flow_run_id), "principal.bootstrap",
                         "ok", detail={"name": name, "role": role}, at=at)
            return True
    actor = authorize(engine, actor_name, "principal.manage", flow_run_id=flow_run_id, at=at)
    with transaction(engine) as session:
        add_principal(session, name, role)
        trail.record(session, actor, "principal.add", "ok",
                     detail={"name": name, "role": role}, at=at)
    return False
