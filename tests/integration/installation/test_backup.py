"""Token backup and restore against real SoftHSM2 tokens, each in its own temporary home.

This process has the session token's module loaded (``SOFTHSM2_CONF`` is read once per load), so
every HSM operation on another home runs in a spawned child (reference pkcs11.md §3). The attacks
are written as the attacker would make them: plain file edits of the backup and plain SQL.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from sqlalchemy import text

from lifecycle.audit.chain import Actor
from lifecycle.config import Settings
from lifecycle.errors import BackupError, HsmError, TokenBusy
from lifecycle.hsm import provision, softhsm_backup
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.token_lock import LOCK_NAME
from lifecycle.installation import steps
from lifecycle.installation.steps import backup, ensure_kek_check, restore
from lifecycle.inventory.db import Engine, make_engine, migrate, transaction
from lifecycle.inventory.kek_checks import get_kek_check

pytestmark = pytest.mark.slow
SPAWN = multiprocessing.get_context("spawn")
OFFICER = Actor("test-officer", "security-officer")
# SoftHSM2 object files: attribute type (8 bytes BE), kind 1 = boolean (8 bytes BE), one byte.
CKA_SENSITIVE, CKA_UNWRAP, CKA_EXTRACTABLE = 0x103, 0x107, 0x162


# --- child side (spawned; only paths and wrapped blobs cross, never a PIN) --------------------
def _settings(home: str) -> Settings:
    return Settings(home=Path(home))


def _init(home: str, db_url: str) -> str:
    steps.init(_settings(home), make_engine(db_url), make_pin_files=False)
    return "ok"


def _unwrap_canary(home: str, blob: bytes) -> str:
    s = _settings(home)
    try:
        with Hsm.open(s).session() as session:
            session.destroy(session.unwrap_stored(s.storage_kek_label, blob))
    except HsmError as exc:
        return exc.cause
    return "ok"


def _plant_session_free_key(home: str) -> str:
    """A PIN holder adds a token key of their own after the backup (restore must drop it)."""
    s = _settings(home)
    os.environ["SOFTHSM2_CONF"] = str(s.softhsm_conf_path)  # this home's token, before the load
    lib = pkcs11.lib(str(s.module_path))
    token = lib.get_token(token_label=s.token_label)
    with token.open(rw=True, user_pin=s.user_pin()) as session:
        session.generate_key(pkcs11.KeyType.AES, 256, label="planted", store=True)
        return str(len(list(session.get_objects({pkcs11.Attribute.LABEL: "planted"}))))


def _count_planted(home: str) -> str:
    s = _settings(home)
    os.environ["SOFTHSM2_CONF"] = str(s.softhsm_conf_path)  # this home's token, before the load
    lib = pkcs11.lib(str(s.module_path))
    token = lib.get_token(token_label=s.token_label)
    with token.open(user_pin=s.user_pin()) as session:
        return str(len(list(session.get_objects({pkcs11.Attribute.LABEL: "planted"}))))


def _hold_open(home: str, ready: Any, release: Any) -> None:
    Hsm.open(_settings(home))
    ready.set()
    release.wait(60)


def _in_child(fn: Callable[..., str], *args: Any) -> str:
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        return pool.submit(fn, *args).result(timeout=120)


# --- helpers ----------------------------------------------------------------------------------
def _new_home(root: Path, db_url: str) -> Settings:
    """A fresh home with its own token, pinned long-lived keys and KEK canary in ``db_url``."""
    s = _settings(str(root))
    provision.generate_pin_files(s)
    provision.init_token(s)
    assert _in_child(_init, str(root), db_url) == "ok"
    return s


def _digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def _canary(engine: Engine, s: Settings) -> bytes:
    with transaction(engine) as db:
        row = get_kek_check(db, s.storage_kek_label)
    assert row is not None
    return bytes(row.blob)


def _events(engine: Engine, action: str) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT outcome, detail, principal FROM audit_event "
                                 "WHERE action = :a ORDER BY seq"), {"a": action}).all()
    assert all(r[2] == OFFICER.principal for r in rows)
    return [(r[0], json.loads(r[1])) for r in rows]


def _bool_entry(attr: int, value: bool) -> bytes:
    return attr.to_bytes(8, "big") + (1).to_bytes(8, "big") + (b"\xff" if value else b"\x00")


def _make_keks_extractable(where: Path) -> int:
    """The attacker's edit (FINDINGS §6): in every unwrapping secret key's object file, set
    SENSITIVE false and EXTRACTABLE true (booleans of private objects are stored in clear),
    then re-hash the manifest's checksums. Returns how many objects were edited."""
    manifest_path = where / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edited = 0
    for path in sorted((where / "tokens").rglob("*.object")):
        data = path.read_bytes()
        if _bool_entry(CKA_UNWRAP, True) not in data or _bool_entry(CKA_SENSITIVE, True) \
                not in data:
            continue
        # The first occurrences are the object's own (attributes are stored by type; the
        # unwrap template, type 0x40000212, comes after both).
        data = data.replace(_bool_entry(CKA_SENSITIVE, True), _bool_entry(CKA_SENSITIVE, False), 1)
        data = data.replace(_bool_entry(CKA_EXTRACTABLE, False),
                            _bool_entry(CKA_EXTRACTABLE, True), 1)
        path.write_bytes(data)
        manifest["files"][path.relative_to(where).as_posix()] = hashlib.sha256(data).hexdigest()
        edited += 1
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return edited


@pytest.fixture
def home(tmp_path: Path, db_url: str, engine: Engine) -> Settings:
    return _new_home(tmp_path / "a", db_url)


# --- tests ------------------------------------------------------------------------------------
def test_ensure_kek_check_is_idempotent(settings: Settings, hsm: Hsm, engine: Engine) -> None:
    assert ensure_kek_check(settings, engine) is True
    blob = _canary(engine, settings)
    assert ensure_kek_check(settings, engine) is False
    assert _canary(engine, settings) == blob
    with hsm.session() as s:
        s.destroy(s.unwrap_stored(settings.storage_kek_label, blob))


def test_backup_is_signed_private_and_recorded(home: Settings, engine: Engine,
                                              tmp_path: Path) -> None:
    result = backup(home, engine, OFFICER, tmp_path / "backups")
    where = result.path
    assert where.parent == tmp_path / "backups" and result.generation == 1
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    raw = (where / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    assert manifest["generation"] == 1 and manifest["token_label"] == home.token_label
    with engine.connect() as conn:
        pins = {r[0]: list(r[1:]) for r in conn.execute(text(
            "SELECT role, label, key_id, check_value FROM hsm_key"))}
        recorded = conn.execute(text("SELECT generation, manifest_sha256 FROM token_backup")).all()
    assert {k["role"]: [k["label"], k["key_id"], k["check_value"]]
            for k in manifest["keys"]} == pins
    assert {"storage-kek", "storage-kek-master", "blob-mac", "audit-signing"} <= set(pins)
    assert softhsm_backup.spki_sha256(manifest["audit_public_key"]) == \
        pins["audit-signing"][2]
    assert manifest["signature"]["alg"] == "ECDSA-P256-SHA256"
    assert [tuple(r) for r in recorded] == [(1, hashlib.sha256(raw).hexdigest())]
    copied = _digests(where)
    copied.pop("manifest.json")
    assert manifest["files"] == copied
    assert {k for k in copied if k.startswith("tokens/")} == {
        f"tokens/{k}" for k in _digests(home.token_dir)}
    assert not [p for p in where.rglob("*") if p.suffix == ".pin" or "secrets" in p.parts]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in where.rglob("*"))
    assert _events(engine, "hsm.backup")[0][0] == "ok"
    assert backup(home, engine, OFFICER, tmp_path / "backups").generation == 2


def test_restore_round_trip_drops_later_changes_and_the_replaced_copy(
        home: Settings, engine: Engine, tmp_path: Path) -> None:
    result = backup(home, engine, OFFICER, tmp_path / "backups")
    assert _in_child(_plant_session_free_key, str(home.home_dir)) == "1"

    report = restore(home, engine, OFFICER, result.path)

    assert report.token_dir == home.token_dir and report.generation == 1
    assert report.checked_keys == 4 and report.checked_blobs >= 1
    assert report.removed is not None and not report.removed.exists()
    assert not list(home.home_dir.glob("tokens.replaced-*"))
    assert not list(home.home_dir.glob(".restore-*"))
    assert _in_child(_count_planted, str(home.home_dir)) == "0"
    assert _in_child(_unwrap_canary, str(home.home_dir), _canary(engine, home)) == "ok"
    outcome, detail = _events(engine, "hsm.restore")[-1]
    assert outcome == "ok" and detail["forced"] is False and detail["generation"] == 1


def test_restore_refuses_a_backup_whose_kek_was_made_extractable(
        home: Settings, engine: Engine, tmp_path: Path) -> None:
    """Attack: edit the object files' flags with file access only, re-hash the manifest."""
    where = backup(home, engine, OFFICER, tmp_path / "backups").path
    assert _make_keks_extractable(where) == 2  # the storage KEK and the master KEK
    before = _digests(home.token_dir)

    with pytest.raises(BackupError, match="signature does not verify"):
        restore(home, engine, OFFICER, where)

    assert _digests(home.token_dir) == before
    assert not list(home.home_dir.glob(".restore-*"))
    outcome, detail = _events(engine, "hsm.restore")[-1]
    assert outcome == "failed" and "signature" in detail["reason"]


def test_restore_refuses_weakened_keys_even_when_signed(home: Settings, engine: Engine,
                                                       tmp_path: Path) -> None:
    """A PIN holder can sign (the audit key signs for them): the staged check still refuses."""
    where = backup(home, engine, OFFICER, tmp_path / "backups").path
    _make_keks_extractable(where)
    manifest = json.loads((where / "manifest.json").read_text())
    manifest.pop("signature")
    with transaction(engine) as db:
        audit_pin = steps._pins(db)["audit-signing"]
    softhsm_backup._sign(home, manifest, audit_pin.check_value, where)
    (where / "manifest.json").write_text(json.dumps(manifest))
    with engine.begin() as conn:  # the re-signed manifest is the recorded one
        conn.execute(text("UPDATE token_backup SET manifest_sha256 = :d"),
                     {"d": hashlib.sha256((where / "manifest.json").read_bytes()).hexdigest()})
    before = _digests(home.token_dir)

    with pytest.raises(BackupError, match="CKA_SENSITIVE is false; policy: true"):
        restore(home, engine, OFFICER, where)

    assert _digests(home.token_dir) == before


def test_older_generation_needs_force_and_is_audited_as_forced(
        home: Settings, engine: Engine, tmp_path: Path) -> None:
    first = backup(home, engine, OFFICER, tmp_path / "backups").path
    backup(home, engine, OFFICER, tmp_path / "backups")
    before = _digests(home.token_dir)

    with pytest.raises(BackupError, match="generation 1 is older than the latest backup "
                                          "recorded, generation 2"):
        restore(home, engine, OFFICER, first)
    assert _digests(home.token_dir) == before

    report = restore(home, engine, OFFICER, first, force=True)
    assert report.generation == 1
    outcome, detail = _events(engine, "hsm.restore")[-1]
    assert outcome == "ok" and detail["forced"] is True
    assert any("older" in reason for reason in detail["overridden"])


def test_unrecorded_generation_needs_force(home: Settings, engine: Engine,
                                           tmp_path: Path) -> None:
    where = backup(home, engine, OFFICER, tmp_path / "backups").path
    with engine.begin() as conn:  # a database writer drops the record
        conn.execute(text("DELETE FROM token_backup"))
    with pytest.raises(BackupError, match="not recorded in this inventory"):
        restore(home, engine, OFFICER, where)
    assert restore(home, engine, OFFICER, where, force=True).generation == 1


def test_key_differing_from_its_pin_is_refused_even_forced(home: Settings, engine: Engine,
                                                           tmp_path: Path) -> None:
    where = backup(home, engine, OFFICER, tmp_path / "backups").path
    with engine.begin() as conn:
        conn.execute(text("UPDATE hsm_key SET key_id = :k WHERE role = 'storage-kek'"),
                     {"k": "00" * 16})
    with pytest.raises(BackupError, match="'storage-kek' in the backup is not the pinned key"):
        restore(home, engine, OFFICER, where, force=True)


def test_restore_of_another_installation_is_refused(home: Settings, engine: Engine,
                                                    tmp_path: Path) -> None:
    other_db = f"sqlite:///{tmp_path / 'other.db'}"
    migrate(make_engine(other_db))
    other = _new_home(tmp_path / "b", other_db)
    foreign = backup(other, make_engine(other_db), OFFICER, tmp_path / "backups").path
    before = _digests(home.token_dir)

    with pytest.raises(BackupError, match="signed by a key other than the audit key pinned"):
        restore(home, engine, OFFICER, foreign, force=True)

    assert _digests(home.token_dir) == before
    assert not list(home.home_dir.glob("tokens.replaced-*"))
    assert not list(home.home_dir.glob(".restore-*"))


def _flip_token_object(where: Path) -> None:
    target = sorted((where / "tokens").rglob("*.object"))[0]
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def _add_extra_file(where: Path) -> None:
    next(p for p in (where / "tokens").iterdir() if p.is_dir()).joinpath("x.object").write_bytes(
        b"planted")


def _drop_manifest(where: Path) -> None:
    (where / "manifest.json").unlink()


def _unsign(where: Path) -> None:
    manifest = json.loads((where / "manifest.json").read_text())
    manifest.pop("signature")
    (where / "manifest.json").write_text(json.dumps(manifest))


def _old_format(where: Path) -> None:
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["format"] = 1
    (where / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    pytest.param(_flip_token_object, "SHA-256 differs", id="checksum"),
    pytest.param(_add_extra_file, "not listed in the manifest", id="extra-file"),
    pytest.param(_drop_manifest, "no manifest", id="no-manifest"),
    pytest.param(_unsign, "not signed", id="unsigned"),
    pytest.param(_old_format, "unknown manifest format", id="unsigned-format-1"),
])
def test_damaged_backup_is_refused(home: Settings, engine: Engine, tmp_path: Path,
                                   damage: Callable[[Path], None], message: str) -> None:
    where = backup(home, engine, OFFICER, tmp_path / "backups").path
    damage(where)
    before = _digests(home.token_dir)
    with pytest.raises(BackupError, match=message):
        restore(home, engine, OFFICER, where, force=True)
    assert _digests(home.token_dir) == before


def test_backup_and_restore_wait_for_processes_holding_the_token(
        home: Settings, engine: Engine, tmp_path: Path) -> None:
    good = backup(home, engine, OFFICER, tmp_path / "backups").path
    ready, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_open, args=(str(home.home_dir), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(TokenBusy, match="a process holds the token open"):
            backup(home, engine, OFFICER, tmp_path / "busy", timeout=0.5)
        with pytest.raises(TokenBusy):
            restore(home, engine, OFFICER, good, timeout=0.5)
        assert not [p for p in (tmp_path / "busy").iterdir()]
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0
    assert backup(home, engine, OFFICER, tmp_path / "busy", timeout=5).path.is_dir()
    assert [o for o, _ in _events(engine, "hsm.backup")] == ["ok", "failed", "ok"]


def test_backup_needs_the_kek_canary_and_the_audit_pin(home: Settings, engine: Engine,
                                                       tmp_path: Path) -> None:
    empty = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    migrate(empty)
    with pytest.raises(BackupError, match="no kek_check canary"):
        backup(home, empty, OFFICER, tmp_path / "backups")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM hsm_key WHERE role = 'audit-signing'"))
    with pytest.raises(BackupError, match="pins no 'audit-signing' key"):
        backup(home, engine, OFFICER, tmp_path / "backups")
