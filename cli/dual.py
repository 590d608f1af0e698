"""Dual control on the command line: a security officer's request waits for a second one.

A security-officer action (``lifecycle.principals.DUAL_CONTROL``) needs two different security
officers' signatures over the same action and parameters. The first officer's command signs the
request and leaves it pending in the inventory (``pending_requests.submit``); the second runs
``meterkeys approve R-...``, sees the parameters, signs them, and this process performs the
action once both signatures, both principals and both nonces check out. The parameters of a
pending request are re-hashed from what is stored, so a database writer who edits them gets a
refusal, not a different action.

Each action's parameters are complete: a vendor's signing key and mapping travel as their text,
not as paths, so the second officer approves what will be done, not a file that may change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from cli.common import console, engine, settings, sign
from lifecycle import pending_requests, principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.factory_import import vendor as vendor_steps
from lifecycle.identity.request import SignedRequest
from lifecycle.identity.signers import Signer
from lifecycle.installation import steps
from lifecycle.pki import ceremony
from lifecycle.pki import steps as pki_steps

Perform = Callable[[Mapping[str, Any], Actor, Sequence[SignedRequest]], str]
SHOWN_CHARS = 72


def request(action: str, params: Mapping[str, Any], key: Signer | None = None) -> str:
    """Sign ``action`` as the first security officer and leave it pending; return its id.

    Raises:
        AccessDenied: the key's principal may not request it (audited).
    """
    values = dict(params)
    request_id = pending_requests.submit(engine(), settings(), sign(action, values, key),
                                         action, values, at=utcnow())
    console.print(f"request [bold]{request_id}[/] ({action}) waits for a second security "
                  f"officer: [bold]meterkeys approve {request_id}[/]")
    return request_id


def approve(request_id: str, confirm: Callable[[], bool], key: Signer | None = None) -> None:
    """Show a pending request, and on confirmation sign it as the second officer and perform it.

    Raises:
        InventoryError: no such pending request.
        AccessDenied: the second signature is refused (the same officer, a role, a replay...).
    """
    pending = pending_requests.get_pending(engine(), request_id)
    show(pending.action, pending.params, title=f"request {request_id}")
    if not confirm():
        console.print("not approved")
        return
    second = sign(pending.action, pending.params, key)
    actor, done = pending_requests.complete(engine(), settings(), request_id, second, at=utcnow())
    console.print(perform(done.action, done.params, actor, done.requests))


def perform_signed(requests: Sequence[SignedRequest], action: str,
                   params: Mapping[str, Any]) -> str:
    """Check two officers' signatures (as ``approve`` does) and perform; for the demo."""
    if action == principals.ENROL:
        actor = principals.enrol(engine(), settings(), requests, params["name"], params["role"],
                                 params["public_pem"], at=utcnow())
    elif action == principals.DISABLE:
        actor = principals.disable(engine(), settings(), requests, params["name"], at=utcnow())
    else:
        actor = principals.authorize(engine(), settings(), list(requests), action,
                                     dict(params), at=utcnow())
    return perform(action, params, actor, requests)


def perform(action: str, params: Mapping[str, Any], actor: Actor,
            requests: Sequence[SignedRequest]) -> str:
    """Perform an authorised security-officer action; return what to tell the officer.

    An enrolment or a disabling is performed by ``principals`` itself, in the transaction that
    checks its signatures; only the message is left.
    """
    return PERFORMERS[action](params, actor, requests)


def show(action: str, params: Mapping[str, Any], *, title: str) -> None:
    """Print an action and its parameters (long texts abbreviated, never a secret)."""
    table = Table("parameter", "value", title=f"{title}: {action}")
    for name, value in sorted(params.items()):
        text = str(value)
        if len(text) > SHOWN_CHARS or "\n" in text:
            text = text.replace("\n", " ")[:SHOWN_CHARS] + f"… ({len(str(value))} chars)"
        table.add_row(name, text)
    console.print(table)


def _vendor_add(p: Mapping[str, Any], actor: Actor,
                requests: Sequence[SignedRequest]) -> str:
    vendor_steps.add_vendor(engine(), actor, p["name"], p["signing_pem"], p["mapping_toml"],
                            source=p["source"], at=utcnow())
    return f"vendor {p['name']} added"


def _vendor_import_key(p: Mapping[str, Any], actor: Actor,
                       requests: Sequence[SignedRequest]) -> str:
    pem, oaep = vendor_steps.issue_import_key(engine(), settings(), actor, p["name"],
                                              at=utcnow())
    out = Path(p["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pem)
    return (f"import public key of {p['name']} written to {out}; the manufacturer wraps each "
            f"batch transport key with RSA-OAEP-{oaep.upper()} under it")


def _backup(p: Mapping[str, Any], actor: Actor,
            requests: Sequence[SignedRequest]) -> str:
    made = steps.backup(settings(), engine(), actor, Path(p["dest"]))
    return f"token backed up to {made.path} (generation {made.generation}, signed)"


def _restore(p: Mapping[str, Any], actor: Actor,
             requests: Sequence[SignedRequest]) -> str:
    report = steps.restore(settings(), engine(), actor, Path(p["src"]), force=bool(p["force"]))
    removed = "; the previous token directory was deleted" if report.removed else ""
    return (f"token generation {report.generation} restored into {report.token_dir} "
            f"({report.checked_keys} pinned keys and {report.checked_blobs} blobs "
            f"checked){removed}")


def _ceremony(p: Mapping[str, Any], actor: Actor,
              requests: Sequence[SignedRequest]) -> str:
    report = ceremony.ceremony(settings(), engine(), actor, renew=list(p["renew"]),
                               revoke=list(p.get("revoke", [])),
                               reason=str(p.get("reason", "key-compromise")), now=utcnow())
    made = ", ".join(f"{name} (generation {gen})" for name, gen in report.made.items())
    return (f"ceremony done: {made or 'no CA was due'}; root CRL {report.crl_number} issued"
            + (f"; revoked {', '.join(report.revoked)}" if report.revoked else "")
            + ("; root token created" if report.root_token_created else ""))


def _vendor_add_ca(p: Mapping[str, Any], actor: Actor,
                   requests: Sequence[SignedRequest]) -> str:
    subject = pki_steps.add_vendor_ca(engine(), actor, p["name"], p["certificate_pem"], utcnow(),
                                      requests=requests)
    return f"factory CA {subject} registered for vendor {p['name']}"


def _enrolled(p: Mapping[str, Any], actor: Actor,
              requests: Sequence[SignedRequest]) -> str:
    return f"principal {p['name']} enrolled as {p['role']}"


def _disabled(p: Mapping[str, Any], actor: Actor,
              requests: Sequence[SignedRequest]) -> str:
    return f"principal {p['name']} disabled"


PERFORMERS: dict[str, Perform] = {
    "vendor.add": _vendor_add,
    "vendor.import-key": _vendor_import_key,
    "hsm.backup": _backup,
    "hsm.restore": _restore,
    "pki.ceremony": _ceremony,
    "vendor.add-ca": _vendor_add_ca,
    principals.ENROL: _enrolled,
    principals.DISABLE: _disabled,
}
