"""Token backup and restore against real SoftHSM2 tokens, each in its own temporary home.

This process has the session token's module loaded (``SOFTHSM2_CONF`` is read once per load), so
every HSM operation on another home runs in a spawned child (reference pkcs11.md §3)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import stat
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lifecycle.config import Settings
from lifecycle.errors import BackupError, HsmError, TokenBusy
from lifecycle.hsm import provision
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import ObjectClass
from lifecycle.hsm.token_lock import LOCK_NAME
from lifecycle.installation.steps import backup, ensure_kek_check, restore
from lifecycle.inventory.db import Engine, make_engine, migrate, transaction
from lifecycle.inventory.kek_checks import get_kek_check

SPAWN = multiprocessing.get_context("spawn")


# --- child side (spawned; only paths and wrapped blobs cross, never a PIN) --------------------
def _settings(home: str) -> Settings:
    return Settings(home=Path(home))


def _provision(home: str, db_url: str) -> str:
    s = _settings(home)
    provision.ensure_long_lived_keys(s)
    ensure_kek_check(s, make_engine(db_url))
    return "ok"


def _destroy_kek(home: str) -> str:
    s = _settings(home)
    with Hsm.open(s).session() as session:
        session.destroy_token_key(s.storage_kek_label, ObjectClass.SECRET_KEY)
    return "ok"


def _unwrap_canary(home: str, blob: bytes) -> str:
    s = _settings(home)
    try:
        with Hsm.open(s).session() as session:
            session.destroy(session.unwrap_aes(s.storage_kek_label, blob))
    except HsmError as exc:
        return exc.cause
    return "ok"


def _hold_open(home: str, ready: Any, release: Any) -> None:
    Hsm.open(_settings(home))
    ready.set()
    release.wait(60)


def _in_child(fn: Callable[..., str], *args: Any) -> str:
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        return pool.submit(fn, *args).result(timeout=120)


# --- helpers ----------------------------------------------------------------------------------
def _new_home(root: Path, db_url: str) -> Settings:
    """A fresh home with its own token, storage KEK, audit key and KEK canary in ``db_url``."""
    s = _settings(str(root))
    provision.generate_pin_files(s)
    provision.init_token(s)
    assert _in_child(_provision, str(root), db_url) == "ok"
    return s


def _digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def _canary(engine: Engine, s: Settings) -> bytes:
    with transaction(engine) as db:
        row = get_kek_check(db, s.storage_kek_label)
    assert row is not None
    return bytes(row.blob)


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
        s.destroy(s.unwrap_aes(settings.storage_kek_label, blob))


def test_backup_writes_private_copy_with_manifest(home: Settings, engine: Engine,
                                                  tmp_path: Path) -> None:
    where = backup(home, engine, tmp_path / "backups")
    assert where.parent == tmp_path / "backups"
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    manifest = json.loads((where / "manifest.json").read_text())
    assert manifest["token_label"] == home.token_label
    assert manifest["storage_kek_label"] == home.storage_kek_label
    copied = _digests(where)
    copied.pop("manifest.json")
    assert manifest["files"] == copied
    assert {k for k in copied if k.startswith("tokens/")} == {
        f"tokens/{k}" for k in _digests(home.token_dir)}
    assert not [p for p in where.rglob("*") if p.suffix == ".pin" or "secrets" in p.parts]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in where.rglob("*"))


def test_restore_round_trip_brings_back_a_lost_kek(home: Settings, engine: Engine,
                                                   tmp_path: Path) -> None:
    blob = _canary(engine, home)
    where = backup(home, engine, tmp_path / "backups")
    assert _in_child(_destroy_kek, str(home.home_dir)) == "ok"
    assert _in_child(_unwrap_canary, str(home.home_dir), blob) == "no such key"

    report = restore(home, engine, where)

    assert report.token_dir == home.token_dir
    assert report.checked_blobs == 1
    assert report.replaced is not None and report.replaced.is_dir()
    assert _in_child(_unwrap_canary, str(home.home_dir), blob) == "ok"
    assert not list(home.home_dir.glob(".restore-*"))


def test_restore_of_another_token_is_refused(home: Settings, engine: Engine,
                                             tmp_path: Path) -> None:
    other_db = f"sqlite:///{tmp_path / 'other.db'}"
    migrate(make_engine(other_db))
    other = _new_home(tmp_path / "b", other_db)
    foreign = backup(other, make_engine(other_db), tmp_path / "backups")
    before = _digests(home.token_dir)

    with pytest.raises(BackupError, match="known-answer check"):
        restore(home, engine, foreign)

    assert _digests(home.token_dir) == before
    assert not list(home.home_dir.glob("tokens.replaced-*"))
    assert not list(home.home_dir.glob(".restore-*"))
    assert _in_child(_unwrap_canary, str(home.home_dir), _canary(engine, home)) == "ok"


def _flip_token_object(where: Path) -> None:
    target = sorted((where / "tokens").rglob("*.object"))[0]
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def _add_extra_file(where: Path) -> None:
    next(p for p in (where / "tokens").iterdir() if p.is_dir()).joinpath("x.object").write_bytes(
        b"planted")


def _drop_manifest(where: Path) -> None:
    (where / "manifest.json").unlink()


@pytest.mark.parametrize("damage, message", [
    pytest.param(_flip_token_object, "SHA-256 differs", id="checksum"),
    pytest.param(_add_extra_file, "not listed in the manifest", id="extra-file"),
    pytest.param(_drop_manifest, "no manifest", id="no-manifest"),
])
def test_damaged_backup_is_refused(home: Settings, engine: Engine, tmp_path: Path,
                                   damage: Callable[[Path], None], message: str) -> None:
    where = backup(home, engine, tmp_path / "backups")
    damage(where)
    before = _digests(home.token_dir)
    with pytest.raises(BackupError, match=message):
        restore(home, engine, where)
    assert _digests(home.token_dir) == before


def test_backup_and_restore_wait_for_processes_holding_the_token(
        home: Settings, engine: Engine, tmp_path: Path) -> None:
    good = backup(home, engine, tmp_path / "backups")
    ready, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_open, args=(str(home.home_dir), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(TokenBusy, match="a process holds the token open"):
            backup(home, engine, tmp_path / "busy", timeout=0.5)
        with pytest.raises(TokenBusy):
            restore(home, engine, good, timeout=0.5)
        assert not [p for p in (tmp_path / "busy").iterdir()]
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0
    assert backup(home, engine, tmp_path / "busy", timeout=5).is_dir()


def test_backup_needs_the_kek_canary(home: Settings, tmp_path: Path) -> None:
    empty = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    migrate(empty)
    with pytest.raises(BackupError, match="no kek_check canary"):
        backup(home, empty, tmp_path / "backups")
