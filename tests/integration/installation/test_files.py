"""Private files: the state directory, the SO PIN after initialisation, the simulated parties.

Each test uses its own home under ``tmp_path``; token initialisation runs in the provisioning
child process, so the session token is never touched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr
from typer.testing import CliRunner

from cli.main import app
from lifecycle.config import Settings, ensure_private_home, private_umask
from lifecycle.errors import ConfigError
from lifecycle.hsm import provision
from lifecycle.identity import signers
from simulator.manufacturer import Manufacturer
from simulator.scenario import MAPPINGS
from tasks import context


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def restore_umask() -> Iterator[None]:
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def test_home_is_created_0700_and_a_shared_home_is_refused(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "var")
    assert ensure_private_home(s) == s.home_dir
    assert _mode(s.home_dir) == 0o700
    s.home_dir.chmod(0o750)
    with pytest.raises(ConfigError, match=r"open to other users \(mode 0750\).*chmod 700"):
        ensure_private_home(s)


def test_commands_refuse_a_home_readable_by_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   restore_umask: None) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    monkeypatch.setenv("METERKEYS_HOME", str(shared))
    context.reset()
    try:
        result = CliRunner().invoke(app, ["hsm", "status"])
    finally:
        context.reset()
    assert result.exit_code == 1
    assert "open to other users (mode 0755)" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_the_edge_sets_umask_077(tmp_path: Path, restore_umask: None) -> None:
    os.umask(0o022)
    private_umask()
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert _mode(tmp_path / "f") == 0o600 and _mode(tmp_path / "d") == 0o700


def test_so_pin_file_is_removed_after_initialisation(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "var", keep_so_pin=False)
    made = {p.name for p in provision.generate_pin_files(s)}
    assert made == {"so.pin", "user.pin"}
    assert _mode(s.home_dir) == 0o700 and _mode(s.secrets_dir) == 0o700

    assert provision.init_token(s) is True

    assert not (s.secrets_dir / "so.pin").exists()
    assert (s.secrets_dir / "user.pin").exists()
    # Later runs make no new SO PIN: it would not be the token's.
    assert provision.generate_pin_files(s) == []
    assert provision.init_token(s) is False
    assert sorted(p.name for p in s.secrets_dir.iterdir()) == ["user.pin"]


def test_so_pin_file_is_kept_when_asked(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "var", keep_so_pin=True)
    provision.generate_pin_files(s)
    assert provision.init_token(s) is True
    assert _mode(s.secrets_dir / "so.pin") == 0o600


def test_a_user_chosen_so_pin_file_is_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / "officer" / "so.pin"
    mine.parent.mkdir(mode=0o700)
    mine.write_text("officer-chosen-pin-0042")
    s = Settings(home=tmp_path / "var", keep_so_pin=False, so_pin_file=mine,
                 pin=SecretStr("user-pin-for-this-test-7"))
    assert provision.init_token(s) is True
    assert mine.exists()


def test_simulated_parties_live_beside_the_home_never_inside(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "var")
    assert s.simulation_dir == tmp_path / "var-simulation"
    assert not s.simulation_dir.is_relative_to(s.home_dir)
    assert Settings(home=tmp_path / "var",
                    simulation_home=tmp_path / "elsewhere").simulation_dir == tmp_path / "elsewhere"
    with pytest.raises(ConfigError, match="lies inside METERKEYS_HOME"):
        _ = Settings(home=tmp_path / "var", simulation_home=tmp_path / "var" / "sim").simulation_dir


def test_simulated_manufacturer_keeps_its_secrets_private(tmp_path: Path) -> None:
    maker = Manufacturer.create(tmp_path / "sim" / "manufacturers" / "acme", "acme", "P-256")
    assert _mode(maker.directory) == 0o700
    assert all(_mode(p) == 0o600 for p in maker.directory.glob("*.key.pem"))
    assert _mode(maker.directory / "acme.signing-key.pem") == 0o600
    public = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    files = maker.make_batch(out=tmp_path / "sim" / "batches", mapping_path=MAPPINGS / "acme.toml",
                             import_public_pem=public, oaep_hash="sha1", count=2)
    assert _mode(files.secrets) == 0o600


def _meterkeys(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    key = home.parent / "first-officer.key.pem"
    if not key.exists():
        signers.generate(home.parent, "first-officer", "p256", None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERKEYS_", "PREFECT_"))}
    env |= {"METERKEYS_HOME": str(home), "PREFECT_HOME": str(home.parent / "prefect"),
            "METERKEYS_PRINCIPAL_KEY": str(key), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, text=True,
                          capture_output=True, timeout=180, check=False,
                          cwd=Path(__file__).resolve().parents[3])


@pytest.mark.parametrize("flag, kept", [pytest.param((), False, id="default"),
                                        pytest.param(("--keep-so-pin",), True, id="keep")])
def test_hsm_init_makes_a_private_home_and_says_the_so_pin_was_not_kept(
        tmp_path: Path, flag: tuple[str, ...], kept: bool) -> None:
    home = tmp_path / "var"
    result = _meterkeys(home, "hsm", "init", "--security-officer", "first-officer", *flag)
    assert result.returncode == 0, result.stderr
    assert "first-officer enrolled as the first security officer" in result.stdout
    assert ("not kept" in result.stdout) is not kept
    assert (home / "secrets" / "so.pin").exists() is kept
    assert _mode(home) == 0o700
    loose = [p for p in home.rglob("*") if _mode(p) & 0o077 and not p.is_symlink()]
    assert loose == []
