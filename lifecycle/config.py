"""Typed settings, read at the edge (CLI, flow entry, worker start), never at import time.

Every field comes from the environment (prefix ``METERKEYS_``) or a ``.env`` file. PINs come from
the environment or from a file (mode 0600) and are never defaulted in code; placeholders are
rejected.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from lifecycle.errors import ConfigError

SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
PLACEHOLDER_PINS = frozenset(
    {"1234", "0000", "12345678", "123456", "changeme", "change-me", "password", "pin", "softhsm",
     "secret", "test", "admin", "user", "default"}
)
MIN_PIN_LENGTH = 8


class Settings(BaseSettings):
    """meterkeys configuration."""

    model_config = SettingsConfigDict(env_prefix="METERKEYS_", env_file=".env", extra="ignore")

    home: Path = Field(default=Path("var"), description="state directory of the embedded default")
    pkcs11_module: Path | None = Field(default=None, description="PKCS#11 module (.so) path")
    softhsm2_conf: Path | None = Field(default=None, description="SOFTHSM2_CONF for SoftHSM2")
    token_label: str = "meterkeys"  # noqa: S105 - a label, not a secret
    pin: SecretStr | None = None
    pin_file: Path | None = None
    so_pin: SecretStr | None = None
    so_pin_file: Path | None = None
    database_url: str | None = None
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=0)
    chunk_size: int = Field(default=5000, ge=1)
    worker_recycle_jobs: int = Field(default=25, ge=1,
                                     description="jobs after which an HSM worker is replaced")
    principal: str | None = None
    storage_kek_label: str = "meterkeys-storage-kek"
    master_kek_label: str = "meterkeys-storage-kek-master"
    blob_mac_label: str = "meterkeys-blob-mac"
    audit_key_label: str = "meterkeys-audit-signing"
    audit_checkpoint_every: int = Field(default=10000, ge=1)

    # --- derived paths -------------------------------------------------------------------------
    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def secrets_dir(self) -> Path:
        return self.home_dir / "secrets"

    @property
    def module_path(self) -> Path:
        """Return the PKCS#11 module to load: configured, or the SoftHSM2 default.

        Raises:
            ConfigError: no module configured and SoftHSM2 is not installed.
        """
        if self.pkcs11_module is not None:
            if not self.pkcs11_module.exists():
                raise ConfigError(f"PKCS#11 module {self.pkcs11_module} does not exist")
            return self.pkcs11_module
        for candidate in SOFTHSM_CANDIDATES:
            if Path(candidate).exists():
                return Path(candidate)
        raise ConfigError("no PKCS#11 module: set METERKEYS_PKCS11_MODULE or install softhsm2")

    @property
    def is_softhsm(self) -> bool:
        return "softhsm" in self.module_path.name

    @property
    def softhsm_conf_path(self) -> Path:
        return self.softhsm2_conf or self.home_dir / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        return self.home_dir / "tokens"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'inventory.db'}"

    @property
    def prefect_home(self) -> Path:
        return self.home_dir / "prefect"

    # --- secrets -------------------------------------------------------------------------------
    def user_pin(self) -> str:
        """Return the token user PIN from the environment or the PIN file.

        Raises:
            ConfigError: no PIN is configured, or it is a placeholder.
        """
        return _read_secret("user PIN", self.pin, self.pin_file or self.secrets_dir / "user.pin")

    def so_pin_value(self) -> str:
        """Return the security officer PIN (token initialisation only).

        Raises:
            ConfigError: no SO PIN is configured, or it is a placeholder.
        """
        return _read_secret("SO PIN", self.so_pin, self.so_pin_file or self.secrets_dir / "so.pin")


def _read_secret(what: str, value: SecretStr | None, file: Path) -> str:
    if value is not None:
        secret = value.get_secret_value()
        source = "the environment"
    elif file.exists():
        secret = file.read_text(encoding="utf-8").strip()
        source = str(file)
    else:
        raise ConfigError(f"no {what}: set it in the environment or in {file}")
    check_secret(what, secret, source)
    return secret


def check_secret(what: str, secret: str, source: str) -> None:
    """Reject an empty, short or placeholder secret, naming where it came from (never its value).

    Raises:
        ConfigError: the secret is unusable.
    """
    if len(secret) < MIN_PIN_LENGTH:
        raise ConfigError(f"{what} from {source} is shorter than {MIN_PIN_LENGTH} characters")
    if secret.lower() in PLACEHOLDER_PINS:
        raise ConfigError(f"{what} from {source} is a placeholder; choose a real one")


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, with explicit overrides."""
    return Settings(**overrides)  # type: ignore[arg-type]
