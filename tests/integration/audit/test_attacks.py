"""Issue 11's database writer, written as the attacker would: plain SQL and plain python-pkcs11.

The defender runs meterkeys as usual: events, checkpoints signed in the HSM and handed to the
witness (a folder the attacker cannot write). The attacker then rewrites the audit tables with
plain SQL, recomputing hashes and digests from their documented formats (``lifecycle.audit.chain``)
with hashlib and json; in one attack they also hold the user PIN and sign with the real audit key
through python-pkcs11. ``audit verify`` (``steps.verify_trail``) must fail and name the event.

Before the witness (hash chain and checkpoints in the database only) every one of these verified
as intact: run this file with the witness check switched off to see it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Mechanism, ObjectClass
from pkcs11.util.ec import encode_ecdsa_signature
from sqlalchemy import Engine, text

from lifecycle import principals
from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import AuditError
from lifecycle.hsm import provision
from lifecycle.installation import steps
from lifecycle.inventory import hsm_keys
from lifecycle.inventory.db import transaction
from tests.attackers import pin_holder_session

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SOFIA = Actor("sofia", principals.SECURITY_OFFICER, "run-1")
WITNESSED = (2, 5, 10)  # the defender's checkpoints; events 11 and 12 stay unsigned
EVENTS = 12
REWRITTEN = 3


# --- the defender --------------------------------------------------------------------------------
@pytest.fixture
def defender(engine: Engine, hsm: Any, settings: Settings, tmp_path: Path) -> Settings:
    """An inventory with the audit key pinned, 12 events, checkpoints at 2, 5 and 10."""
    mine = settings.model_copy(update={"witness_dir": tmp_path / "witness"})
    pin = next(s.pin for s in provision.ensure_keys(mine) if s.role == "audit-signing")
    with transaction(engine) as s:
        hsm_keys.put_pin(s, pin.role, pin.label, pin.key_id, pin.check_value)
    for seq in range(1, EVENTS + 1):
        with transaction(engine) as s:
            added = "mallory" if seq == REWRITTEN else f"user{seq}"
            trail.record(s, SOFIA, "principal.add", "ok", at=T0 + timedelta(minutes=seq),
                         detail={"name": added, "role": "operator"})
            if seq in WITNESSED:
                with hsm.session() as hs:
                    assert trail.checkpoint(s, hs, mine, T0 + timedelta(minutes=seq)) is not None
    assert steps.verify_trail(mine, engine) == EVENTS
    return mine


def _verify_fails(settings: Settings, engine: Engine) -> AuditError:
    with pytest.raises(AuditError) as info:
        steps.verify_trail(settings, engine)
    return info.value


# --- the attacker's tools: plain SQL, hashlib, json, python-pkcs11 ------------------------------
def _iso(value: Any) -> str:
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    if at.utcoffset() is None:
        at = at.replace(tzinfo=UTC)
    return str(at.astimezone(UTC).isoformat(timespec="microseconds"))


def _sql_time(engine: Engine, at: datetime) -> Any:
    # SQLite holds SQLAlchemy's text form of a UTC time; PostgreSQL a timestamp.
    return at.strftime("%Y-%m-%d %H:%M:%S.%f") if engine.dialect.name == "sqlite" else at


def _event_hash(prev: str, row: dict[str, Any]) -> str:
    fields = {k: row[k] for k in ("seq", "principal", "role", "action", "outcome",
                                  "meter_serial", "batch_id", "key_version_id", "flow_run_id",
                                  "detail")}
    fields["at"] = _iso(row["at"])
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(prev.encode("ascii") + body.encode("utf-8")).hexdigest()


def _rewrite_and_rechain(engine: Engine) -> list[dict[str, Any]]:
    """Rewrite event 3 (who added mallory) and re-chain everything after it; return the rows."""
    with engine.begin() as conn:
        rows = [dict(r._mapping) for r in conn.execute(
            text("SELECT * FROM audit_event ORDER BY seq"))]
        rows[REWRITTEN - 1]["detail"] = json.dumps({"name": "mallory", "role": "auditor"},
                                                   sort_keys=True, separators=(",", ":"))
        prev = rows[REWRITTEN - 2]["hash"]
        for row in rows[REWRITTEN - 1:]:
            row["prev_hash"], row["hash"] = prev, _event_hash(prev, row)
            prev = row["hash"]
            conn.execute(text("UPDATE audit_event SET detail = :detail, prev_hash = :prev_hash, "
                              "hash = :hash WHERE seq = :seq"), row)
        conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})
        conn.execute(text("DELETE FROM audit_checkpoint"))
    return rows


@pytest.fixture
def pin_holder(settings: Settings) -> Iterator[Any]:
    """A plain python-pkcs11 session on the token, logged in with the user PIN."""
    with pin_holder_session(settings) as session:
        yield session


def _resign(engine: Engine, session: Any, label: str, rows: list[dict[str, Any]]) -> None:
    """Sign fresh checkpoints of the rewritten chain with the real audit key; store them."""
    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    with engine.begin() as conn:
        installation = conn.execute(text("SELECT id FROM installation")).scalar_one()
        for seq in WITNESSED:
            at = T0 + timedelta(days=1, minutes=seq)
            body = json.dumps({"purpose": "meterkeys-audit-checkpoint/1",
                               "installation": installation, "seq": seq,
                               "head": rows[seq - 1]["hash"], "time": _iso(at)},
                              sort_keys=True, separators=(",", ":"))
            digest = hashlib.sha256(body.encode("ascii")).digest()
            signature = encode_ecdsa_signature(private.sign(digest, mechanism=Mechanism.ECDSA))
            conn.execute(text(
                "INSERT INTO audit_checkpoint (seq, head_hash, signature, key_label, at) "
                "VALUES (:seq, :head, :sig, :label, :at)"),
                {"seq": seq, "head": rows[seq - 1]["hash"], "sig": bytes(signature),
                 "label": label, "at": _sql_time(engine, at)})


# --- the attacks ---------------------------------------------------------------------------------
def test_rewritten_event_rechained_with_checkpoints_deleted(defender: Settings,
                                                            engine: Engine) -> None:
    _rewrite_and_rechain(engine)
    err = _verify_fails(defender, engine)
    assert err.seq == REWRITTEN  # the event after the last witnessed head that still matches
    assert "rewritten" in err.reason and "seq 5" in err.reason


def test_rewritten_event_resigned_with_the_real_key(defender: Settings, engine: Engine,
                                                    pin_holder: Any) -> None:
    rows = _rewrite_and_rechain(engine)
    _resign(engine, pin_holder, defender.audit_key_label, rows)
    err = _verify_fails(defender, engine)
    assert err.seq == REWRITTEN
    assert "rewritten" in err.reason and "re-chained" in err.reason


def test_trail_truncated_to_an_old_checkpoint(defender: Settings, engine: Engine) -> None:
    with engine.begin() as conn:
        kept = conn.execute(text("SELECT hash FROM audit_event WHERE seq = 5")).scalar_one()
        conn.execute(text("DELETE FROM audit_event WHERE seq > 5"))
        conn.execute(text("DELETE FROM audit_checkpoint WHERE seq > 5"))
        conn.execute(text("UPDATE audit_head SET seq = 5, hash = :h"), {"h": kept})
    err = _verify_fails(defender, engine)
    assert err.seq == 6
    assert "seq 10" in err.reason and "truncated" in err.reason


def test_trail_emptied(defender: Settings, engine: Engine) -> None:
    with engine.begin() as conn:
        for table in ("audit_event", "audit_checkpoint", "audit_head"):
            conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 - fixed table names
    err = _verify_fails(defender, engine)
    assert err.seq == 1
    assert "emptied" in err.reason


def test_checkpoints_of_a_key_the_attacker_pinned(defender: Settings, engine: Engine) -> None:
    """Re-pinning the audit key in the inventory does not make the attacker's key count."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE hsm_key SET check_value = :v WHERE role = 'audit-signing'"),
                     {"v": "ab" * 32})
    err = _verify_fails(defender, engine)
    assert err.seq is None and "not the key pinned" in err.reason
