"""Principals and roles: who may perform which action, proven by a signed request.

Roles:
    security-officer  holds the HSM (token PINs, backups), onboards vendors, enrols and disables
                      principals (with a second security officer: dual control).
    operator          runs the fleet's daily work: imports factory batches, reads meters,
                      signs audit checkpoints.
    auditor           reads: meters, the audit trail and the principals; verifies the trail and
                      the key blobs' bindings.
    system            the scheduled runs: signs audit checkpoints, verifies the trail and
                      publishes the online CAs' CRLs, nothing else.

The security officer may perform every action, audit reading and verifying included. That is a
decision, not an oversight: refusing them an operator's or auditor's action would be theatre
they could bypass by enrolling a second name, and it would hide who really acted. Separation of
duties rests instead on what no role can do alone: no action alters or deletes audit events
(the trail is append-only, its head is signed in the HSM), every refusal is itself audited, the
auditor role is read-only so that review does not need the officer (NIST SP 800-53 AC-5), and
the actions that change who holds power or keys need two security officers (``DUAL_CONTROL``;
NIST SP 800-57 Part 2 §6.1.2, split knowledge and dual control).

Who acts (``lifecycle.identity`` draws the model): no name, parameter, environment variable or
operating-system user chooses the principal. ``authorize`` takes signed requests and accepts
them when each signer's enrolment verifies from its row alone back to the anchor outside the
inventory (``verify_principal``), its role may perform the action, its signature verifies, the
requests are for these parameters, this installation and fresh, dual control holds where
required, and no nonce was used before. The nonces go into the inventory in the transaction
that records ``request.accepted``; a refusal is audited (outcome ``denied``) in its own
committed transaction, a replay as ``request.replayed``.

Bootstrap: ``enrol_root`` enrols the first security officer (``hsm init``) while no principal
exists, with a request signed by its own key (proof of possession), and writes the anchor. The
root may then enrol one second security officer alone (appended to the anchor); every other
enrolment, and every disabling, needs two security officers. ``lifecycle.pending_requests``
lets two officers sign a dual-control request at different times, without a server.

An action not in the table is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import AccessDenied, InventoryError, ReplayedRequest, RequestError
from lifecycle.identity import anchor, keys, request, rules
from lifecycle.identity.request import SignedRequest, Signer
from lifecycle.inventory import audit_events, installations
from lifecycle.inventory import principals as table
from lifecycle.inventory import requests as pending_table
from lifecycle.inventory.db import Engine, Session, snapshot, transaction
from lifecycle.inventory.principals import Principal

SECURITY_OFFICER = rules.SECURITY_OFFICER
OPERATOR = "operator"
AUDITOR = "auditor"
SYSTEM = "system"
ROLES = (SECURITY_OFFICER, OPERATOR, AUDITOR, SYSTEM)
ENROL, DISABLE = rules.ENROL, "principal.disable"

_SO = frozenset({SECURITY_OFFICER})
PERMISSIONS: dict[str, frozenset[str]] = {
    "hsm.init": _SO,
    "hsm.backup": _SO,
    "hsm.restore": _SO,
    "vendor.add": _SO,
    "vendor.import-key": _SO,
    "pki.ceremony": _SO,
    "pki.revoke": _SO,
    "pki.crl": frozenset({SECURITY_OFFICER, OPERATOR, SYSTEM}),
    "vendor.add-ca": _SO,
    ENROL: _SO,
    DISABLE: _SO,
    "batch.import": frozenset({SECURITY_OFFICER, OPERATOR}),
    "meter.claim": frozenset({SECURITY_OFFICER, OPERATOR}),
    "audit.checkpoint": frozenset({SECURITY_OFFICER, OPERATOR, SYSTEM}),
    "meter.read": frozenset({SECURITY_OFFICER, OPERATOR, AUDITOR}),
    "audit.read": frozenset({SECURITY_OFFICER, AUDITOR}),
    "audit.verify": frozenset({SECURITY_OFFICER, AUDITOR, SYSTEM}),
    "inventory.verify": frozenset({SECURITY_OFFICER, AUDITOR}),
    "principal.read": frozenset({SECURITY_OFFICER, AUDITOR}),
}
BOOTSTRAP = "principal.bootstrap"
DUAL_CONTROL = frozenset({ENROL, DISABLE, "vendor.add", "vendor.import-key", "hsm.backup",
                          "hsm.restore", "pki.ceremony", "vendor.add-ca"})
ACCEPTED, REPLAYED, PENDING_EVENT = "request.accepted", "request.replayed", "request.pending"

T = TypeVar("T")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")


@dataclass(frozen=True)
class VerifiedPrincipal:
    """A principal whose enrolment verified: name, role and key as the enrolment signed them."""

    name: str
    role: str
    fingerprint: str
    public_pem: str
    disabled: bool = False


# --- the table -----------------------------------------------------------------------------------
def may(role: str | None, action: str) -> bool:
    """Return whether a role may perform an action (no role may do nothing).

    Raises:
        ValueError: the action is not in the permission table.
    """
    check_known(action)
    return role in PERMISSIONS[action]


def check_known(action: str) -> None:
    """Raises:
        ValueError: the action is not in the table (a programming error).
    """
    if action not in PERMISSIONS:
        raise ValueError(f"unknown action {action!r}")


def enrolment_params(name: str, role: str, public_pem: str) -> dict[str, str]:
    """Return the parameters an enrolment request signs: name, role, the key's normalised PEM.

    Raises:
        InventoryError: unknown role, or an empty name or one with surrounding spaces.
        RequestError: the key is not an EC P-256 or Ed25519 public key.
    """
    if role not in ROLES:
        raise InventoryError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    _check_name(name)
    return rules.enrolment_params(name, role, keys.normalize_pem(public_pem, "public_pem"))


def _check_name(name: str) -> None:
    if not name or name != name.strip() or len(name) > 128:
        raise InventoryError(f"principal name {name!r} is empty, too long or has surrounding "
                             "spaces")
    if _HEX_RUN.search(name):  # the audit trail refuses such runs (lifecycle.audit.chain)
        raise InventoryError("a principal name may not hold 32 or more hex digits in a row")


def add_principal(session: Session, name: str, role: str) -> Principal:
    """Add a principal row with no key inside the caller's transaction (it can never act:
    nothing verifies it; for tests and fixtures that need a row only).

    Raises:
        InventoryError: unknown role, empty name, or a principal of that name exists.
    """
    if role not in ROLES:
        raise InventoryError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    _check_name(name)
    return table.insert_principal(session, name, role)


def role_of(session: Session, name: str) -> str | None:
    """Return the stored role of an enabled principal, or None (unverified: for display)."""
    return table.enabled_role(session, name)


def list_principals(session: Session) -> list[Principal]:
    """Return every principal by name."""
    return table.list_principals(session)


# --- clients -------------------------------------------------------------------------------------
def installation_id(engine: Engine) -> str:
    """Return the inventory's installation id (what requests are signed for).

    Raises:
        InventoryError: the inventory has no installation id.
    """
    with transaction(engine) as session:
        return _installation(session)


def _installation(session: Session) -> str:
    found = installations.installation_id(session)
    if found is None:
        raise InventoryError("the inventory has no installation id (deleted?)")
    return found


def signer_name(engine: Engine, public_pem: str) -> str:
    """Return the name of the enabled principal enrolled with this key.

    Raises:
        RequestError: no enabled principal holds the key (or it is not an allowed key).
    """
    fp = keys.fingerprint(public_pem)
    with transaction(engine) as session:
        row = table.by_fingerprint(session, fp)
    if row is None or row.disabled:
        raise RequestError("key", f"no enrolled principal holds this key (fingerprint {fp})")
    return row.name


def sign(engine: Engine, signer: Signer, action: str, params: Mapping[str, Any], *,
         at: datetime) -> SignedRequest:
    """Sign a request for ``action`` on ``params`` as the principal holding the signer's key.

    Raises:
        RequestError: no enabled principal holds the key.
        InventoryError: the inventory has no installation id.
        ConfigError, HsmError: the signer could not sign.
    """
    name = signer_name(engine, signer.public_key_pem())
    return request.make(action, params, name, installation_id(engine), at, signer)


# --- verification --------------------------------------------------------------------------------
class _Verifier:
    """Verifies principals of one session against the anchor, caching within one call."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.anchor = anchor.read(settings.witness_path)
        self.installation = _installation(session)
        self.cache: dict[str, rules.Record] = {}
        self._trail: dict[str, bool] | None = None  # read once per verifier, when first needed

    def __call__(self, name: str) -> VerifiedPrincipal:
        if table.get(self.session, name) is None:
            raise RequestError(f"principal {name!r}", "unknown principal", principal=name)
        record = rules.verify_enrolment(name, self._lookup, self.anchor, self.installation,
                                        self.cache)
        # The row's flag alone is the database's word: a writer could clear it. The trail's
        # last enrol/disable of the name counts too (``audit verify`` holds the trail to the
        # witness).
        if self._trail is None:
            self._trail = _trail_state(self.session)
        disabled = record.disabled or self._trail.get(name) is False
        return VerifiedPrincipal(record.name, record.role, str(record.fingerprint),
                                 str(record.public_pem), disabled)

    def _lookup(self, name: str) -> rules.Record | None:
        row = table.get(self.session, name)
        if row is None:
            return None
        return rules.Record(row.name, row.role, row.public_pem, row.fingerprint, row.enrolment,
                            row.disabled)


def verify_principal(session: Session, settings: Settings, name: str) -> VerifiedPrincipal:
    """Verify a principal from its row alone, trusting nothing else in the database.

    The fingerprint must be the key's, and the row's enrolment must be signed requests for
    ``principal.enrol`` on its name, role and key in this installation, by two security
    officers verified the same way, or be the anchored root's or second's (see
    ``lifecycle.identity.rules.verify_enrolment``). Freshness and nonces do not apply to
    stored enrolments. A disabled principal is reported as such; the caller refuses it.

    Raises:
        RequestError: unknown principal, or ``principal X: enrolment does not verify (why)``.
        AuditError: the anchor file is malformed.
        InventoryError: the inventory has no installation id.
    """
    return _Verifier(session, settings)(name)


def verify_all(engine: Engine, settings: Settings) -> list[str]:
    """Verify every principal; return one problem line per principal that fails (none: all
    verify). For ``audit verify`` and ``inventory verify``.

    Raises:
        InventoryError: the inventory has no installation id.
    """
    problems = []
    with snapshot(engine) as session:
        try:
            verifier = _Verifier(session, settings)
        except RequestError as exc:  # pragma: no cover - the constructor raises AuditError
            return [str(exc)]
        rows = table.list_principals(session)
        for row in rows:
            try:
                verifier(row.name)
            except AccessDenied as exc:
                problems.append(str(exc))
        root = verifier.anchor.root if verifier.anchor else None
        if root is not None and root not in {row.name for row in rows}:
            problems.append(f"principal {root!r}: the anchored root has no row")
        problems += _against_trail(session, rows)
    return problems


def _trail_state(session: Session) -> dict[str, bool]:
    """Return, per principal name, whether the audit trail's last word on it enabled it."""
    state: dict[str, bool] = {}
    for action, detail in audit_events.details_of(session, (BOOTSTRAP, ENROL, DISABLE)):
        name = json.loads(detail).get("name")
        if isinstance(name, str):
            state[name] = action != DISABLE
    return state


def _against_trail(session: Session, rows: Sequence[Principal]) -> list[str]:
    """Compare each principal's row with what the audit trail says happened to it: a row the
    trail never enrolled, or one enabled although the trail disabled it (a ``disabled`` flag
    cleared by SQL), is a problem. The trail itself is checked against the witness by
    ``audit verify``, so its word here is the witnessed one."""
    state = _trail_state(session)
    problems = []
    for row in rows:
        if row.public_pem is None:
            continue  # a row without a key never acts (``add_principal``)
        if row.name not in state:
            problems.append(f"principal {row.name!r}: no enrolment of it in the audit trail")
        elif not state[row.name] and not row.disabled:
            problems.append(f"principal {row.name!r}: enabled, but the audit trail disabled it")
    return problems


# --- authorisation -------------------------------------------------------------------------------
def authorize(engine: Engine, settings: Settings, requests: Sequence[SignedRequest],
              action: str, params: Mapping[str, Any], *, at: datetime,
              flow_run_id: str | None = None) -> Actor:
    """Accept signed requests for ``action`` on ``params``; return the first requester as Actor.

    Accepted when every request is for this action, these parameters and this installation;
    the newest is at most ``request_max_age_seconds`` old and every one at most
    ``approval_window_seconds`` (none a minute ahead); each signer verifies
    (``verify_principal``), is enabled, has a role that may perform the action and signed with
    its enrolled key; two security officers signed a ``DUAL_CONTROL`` action; and no nonce was
    used before. The nonces are recorded with the audit event ``request.accepted`` in one
    transaction. A refusal is audited (``denied``, ``request.replayed`` for a replay) in its
    own committed transaction.

    Raises:
        AccessDenied: naming the principal and the reason (``RequestError`` for the request
            itself, ``ReplayedRequest`` for a used nonce).
        ValueError: the action is not in the permission table.
    """
    check_known(action)
    return guarded(engine, requests, action, at, flow_run_id, lambda session: accept(
        session, settings, requests, action, params, at, flow_run_id))


def authorize_encoded(engine: Engine, settings: Settings, encoded: str, action: str,
                      params: Mapping[str, Any], *, at: datetime,
                      flow_run_id: str | None = None) -> Actor:
    """``authorize`` for requests as the text a flow run receives (parameter or run input);
    text that does not decode is refused and audited like any other refusal.

    Raises:
        RequestError: the text is not an encoded list of signed requests (audited).
        AccessDenied: see ``authorize``.
    """
    check_known(action)
    try:
        requests = request.decode(encoded)
    except RequestError as exc:
        _record_denial(engine, Actor("unknown", None, flow_run_id), action, exc, at)
        raise
    return authorize(engine, settings, requests, action, params, at=at,
                     flow_run_id=flow_run_id)


def guarded(engine: Engine, requests: Sequence[SignedRequest], action: str, at: datetime,
            flow_run_id: str | None, work: Callable[[Session], T]) -> T:
    """Run ``work`` in one transaction; a refusal is audited in its own transaction (the
    requests' first principal named as claimed) and raised again."""
    try:
        with transaction(engine) as session:
            return work(session)
    except AccessDenied as exc:
        claimed = requests[0].request.principal if requests else "unknown"
        _record_denial(engine, Actor(claimed, None, flow_run_id), action, exc, at)
        raise


def _record_denial(engine: Engine, actor: Actor, action: str, exc: AccessDenied,
                   at: datetime) -> None:
    # The reason quotes what the request claims (a principal's name, up to 128 characters):
    # a run of hex digits there must not let a refusal go unrecorded (the trail refuses such
    # runs as possible key material), so it is elided.
    detail: dict[str, Any] = {"reason": _HEX_RUN.sub("<hex elided>", str(exc))}
    event = action
    if isinstance(exc, ReplayedRequest):
        event, detail = REPLAYED, {**detail, "action": action}
    with transaction(engine) as session:
        trail.record(session, actor, event, "denied", detail=detail, at=at)


def accept(session: Session, settings: Settings, requests: Sequence[SignedRequest],
           action: str, params: Mapping[str, Any], at: datetime, flow_run_id: str | None,
           *, single_ok: bool = False) -> Actor:
    """Accept the requests for ``action`` and ``params``: check them, their signers and dual
    control, consume their nonces and record ``request.accepted``; return who acts.

    Raises:
        AccessDenied: as ``authorize``.
    """
    digest = checked(session, settings, requests, action, params, at)
    roles = check_signers(session, settings, requests, action)
    if action in DUAL_CONTROL:
        rules.check_dual_control(roles, action, single_ok=single_ok)
    _consume(session, requests, action, at)
    first = requests[0].request.principal
    actor = Actor(first, roles[first], flow_run_id)
    trail.record(session, actor, ACCEPTED, "ok", detail=_detail(action, digest, requests), at=at)
    return actor


def checked(session: Session, settings: Settings, requests: Sequence[SignedRequest],
            action: str, params: Mapping[str, Any], at: datetime) -> str:
    """Check what the requests say (action, digest, installation, time); return the digest."""
    digest = request.params_digest(params)
    rules.check_matches(requests, action, digest, _installation(session))
    rules.check_fresh(requests, at, settings.request_max_age_seconds,
                      settings.approval_window_seconds)
    return digest


def check_signers(session: Session, settings: Settings, requests: Sequence[SignedRequest],
                  action: str) -> dict[str, str]:
    """Verify each signer and its signature; return signer -> role."""
    verify = _Verifier(session, settings)
    roles = {}
    for signed in requests:
        who = verify(signed.request.principal)
        if who.disabled:
            raise AccessDenied(who.name, who.role, action, "the principal is disabled")
        if not may(who.role, action):
            raise AccessDenied(who.name, who.role, action, "role not permitted")
        rules.verify_signature(signed, who.public_pem)
        roles[who.name] = who.role
    return roles


def _consume(session: Session, requests: Sequence[SignedRequest], action: str,
             at: datetime) -> None:
    # Under the audit head's lock, as every acceptance: two processes accepting the same
    # request queue here, and the second sees the first's nonce.
    trail.lock_head(session)
    nonces = [s.request.nonce for s in requests]
    used = pending_table.used_nonces(session, nonces)
    if used:
        signed = requests[nonces.index(used[0])]
        raise ReplayedRequest(rules.by(signed), "nonce already used: the request was accepted "
                                                "before (replay)",
                              principal=signed.request.principal, action=action)
    pending_table.use_nonces(session, [(s.request.nonce, s.request.principal, action)
                                       for s in requests], at)


def verify_stored(session: Session, settings: Settings, requests: Sequence[SignedRequest],
                  action: str, params: Mapping[str, Any]) -> None:
    """Verify signed requests kept with a record as the proof that it was authorised (a
    registration made under dual control): for this action, these parameters and this
    installation, each signer's enrolment verifying back to the anchor, its role allowed, its
    signature good, and two security officers where the action needs them. Freshness and
    nonces do not apply to a stored proof, and a signer disabled since keeps what it signed.

    Raises:
        RequestError: the requests do not match, a signature or an enrolment does not verify,
            or dual control does not hold.
        AccessDenied: a signer's role may not perform the action.
    """
    rules.check_matches(requests, action, request.params_digest(params), _installation(session))
    verify = _Verifier(session, settings)
    roles = {}
    for signed in requests:
        who = verify(signed.request.principal)
        if not may(who.role, action):
            raise AccessDenied(who.name, who.role, action, "role not permitted")
        rules.verify_signature(signed, who.public_pem)
        roles[who.name] = who.role
    if action in DUAL_CONTROL:
        rules.check_dual_control(roles, action)


def _detail(action: str, digest: str, requests: Sequence[SignedRequest]) -> dict[str, Any]:
    return {"action": action, "params_digest": digest, "requests": [
        {"principal": s.request.principal, "nonce": s.request.nonce,
         "time": request.iso(s.request.time), "signature": s.signature} for s in requests]}


# --- enrolment -----------------------------------------------------------------------------------
def enrol_root(engine: Engine, settings: Settings, signed: SignedRequest, public_pem: str, *,
               at: datetime) -> None:
    """Enrol the first security officer (``hsm init``) and write the anchor naming it.

    Only while no principal exists (under the audit head's lock, so two bootstraps cannot both
    succeed). The request is signed by the new officer's own key, for ``principal.enrol`` on
    ``enrolment_params(name, security-officer, public_pem)``: proof that it holds the key.
    Audited as ``principal.bootstrap``; a refused request is audited as denied.

    Raises:
        RequestError: the request is not for this, not fresh, or not signed by that key.
        InventoryError: principals exist already, or the name is not a name.
        AuditError: the anchor names another root or installation, or cannot be written.
    """
    name = signed.request.principal
    params = enrolment_params(name, SECURITY_OFFICER, public_pem)
    guarded(engine, [signed], "principal.bootstrap", at, None,
             lambda session: _bootstrap(session, settings, signed, params, at))


def _bootstrap(session: Session, settings: Settings, signed: SignedRequest,
               params: dict[str, str], at: datetime) -> None:
    trail.lock_head(session)  # serialises concurrent bootstraps
    if table.count_principals(session):
        raise InventoryError("principals exist already: the first security officer is "
                             "enrolled once; enrol others with two security officers")
    digest = checked(session, settings, [signed], ENROL, params, at)
    rules.verify_signature(signed, params["public_pem"])
    _consume(session, [signed], ENROL, at)
    fp = keys.fingerprint(params["public_pem"])
    anchor.write_root(settings.witness_path, _installation(session), params["name"], fp)
    table.insert_principal(session, params["name"], SECURITY_OFFICER,
                           public_pem=params["public_pem"], fingerprint=fp,
                           enrolment=request.encode([signed]))
    detail = {"name": params["name"], "role": SECURITY_OFFICER, "fingerprint": fp,
              **_detail(ENROL, digest, [signed])}
    trail.record(session, Actor(params["name"], SECURITY_OFFICER), BOOTSTRAP, "ok",
                 detail=detail, at=at)


def enrol(engine: Engine, settings: Settings, requests: Sequence[SignedRequest], name: str,
          role: str, public_pem: str, *, at: datetime, flow_run_id: str | None = None) -> Actor:
    """Enrol a principal with a role and a public key, on requests two security officers
    signed over ``enrolment_params(name, role, public_pem)``; return the acting Actor.

    The row keeps the requests (``enrolment``): they are what verifies it later. While the root
    is the only security officer, it may enrol one second security officer alone, once; that
    officer is appended to the anchor. A key enrolled for another principal is refused.

    Raises:
        AccessDenied: see ``authorize`` (audited).
        InventoryError: unknown role, a bad or taken name, or the key is enrolled already.
        AuditError: the anchor could not take the second security officer.
    """
    params = enrolment_params(name, role, public_pem)

    def work(session: Session) -> Actor:
        second = _second_officer(session, settings, requests, params)
        actor = accept(session, settings, requests, ENROL, params, at, flow_run_id,
                        single_ok=second)
        enrol_in(session, settings, requests, params, actor, at, second=second)
        return actor

    return guarded(engine, requests, ENROL, at, flow_run_id, work)


def _second_officer(session: Session, settings: Settings, requests: Sequence[SignedRequest],
                    params: Mapping[str, str]) -> bool:
    """Whether this is the root enrolling the anchor's one second officer, alone."""
    found = anchor.read(settings.witness_path)
    return (found is not None and found.second is None
            and params["role"] == SECURITY_OFFICER and len(requests) == 1
            and requests[0].request.principal == found.root
            and table.enabled_with_role(session, SECURITY_OFFICER) == [found.root])


def enrol_in(session: Session, settings: Settings, requests: Sequence[SignedRequest],
             params: Mapping[str, str], actor: Actor, at: datetime, *, second: bool) -> None:
    """Enrol a principal in the caller's transaction (the requests already accepted).

    Raises:
        InventoryError: the key or the name is enrolled already.
    """
    fp = keys.fingerprint(params["public_pem"])
    holder = table.by_fingerprint(session, fp)
    if holder is not None:
        raise InventoryError(f"key {fp} is already enrolled for principal {holder.name!r}: "
                             "one key, one principal")
    if table.get(session, params["name"]) is not None:
        raise InventoryError(f"principal {params['name']!r} already exists")
    if second:
        anchor.add_second(settings.witness_path, _installation(session), params["name"], fp)
    table.insert_principal(session, params["name"], params["role"],
                           public_pem=params["public_pem"], fingerprint=fp,
                           enrolment=request.encode(requests))
    trail.record(session, actor, ENROL, "ok", detail={
        "name": params["name"], "role": params["role"], "fingerprint": fp}, at=at)


def disable(engine: Engine, settings: Settings, requests: Sequence[SignedRequest], name: str,
            *, at: datetime, flow_run_id: str | None = None) -> Actor:
    """Disable a principal on requests two security officers signed over ``{"name": name}``.

    The row keeps the requests (``disabled_by``). The last enabled security officer is never
    disabled.

    Raises:
        AccessDenied: see ``authorize`` (audited).
        InventoryError: no such principal, disabled already, or the last security officer.
    """
    params = {"name": name}

    def work(session: Session) -> Actor:
        actor = accept(session, settings, requests, DISABLE, params, at, flow_run_id)
        disable_in(session, requests, name, actor, at)
        return actor

    return guarded(engine, requests, DISABLE, at, flow_run_id, work)


def disable_in(session: Session, requests: Sequence[SignedRequest], name: str, actor: Actor,
               at: datetime) -> None:
    """Disable a principal in the caller's transaction (the requests already accepted).

    Raises:
        InventoryError: it is the last enabled security officer, or unknown.
    """
    if table.enabled_with_role(session, SECURITY_OFFICER) == [name]:
        raise InventoryError(f"principal {name!r} is the last enabled security officer: "
                             "enrol another before disabling it")
    table.set_disabled(session, name, request.encode(requests))
    trail.record(session, actor, DISABLE, "ok", detail={"name": name}, at=at)
