"""Typed settings, read at the edge (CLI, flow entry, worker start), never at import time.

Every field comes from the environment (prefix ``METERKEYS_``) or a ``.env`` file. PINs come from
the environment or from a file (mode 0600) and are never defaulted in code; placeholders are
rejected.

Files (``ensure_private_home``, ``private_umask``): the state directory (``METERKEYS_HOME``) holds
the token, the PIN files and the inventory, so it is made 0700 and every process that writes
into it runs under umask 077; a home that others can read or enter is refused rather than
silently tightened, since its contents may already have been copied. The simulated parties'
files (manufacturers' signing keys, factory CAs, meter secrets) live in ``simulation_dir``,
never under the home: they stand for other organisations' secrets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

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
    worker_recycle_objects: int = Field(default=500_000, ge=1,
                                        description="HSM session objects a worker makes (keys "
                                                    "generated or unwrapped in flight) after "
                                                    "which the HSM workers are replaced "
                                                    "together")
    principal_key: str | None = Field(default=None, description="your principal's private key: "
                                      "a PEM file, or pkcs11:token=LABEL;object=LABEL (a smart "
                                      "card)")
    principal_key_passphrase_file: Path | None = Field(default=None, description="file holding "
                                                       "the passphrase of the PEM private key")
    principal_key_pin_file: Path | None = Field(default=None, description="file holding the "
                                                "smart card's PIN")
    principal_key_module: Path | None = Field(default=None, description="the smart card's "
                                              "PKCS#11 module (default: the HSM's)")
    request_max_age_seconds: int = Field(default=900, ge=1, description="how old the newest "
                                         "signature of a request may be")
    approval_window_seconds: int = Field(default=86400, ge=1, description="how old any "
                                         "signature of a dual-control request may be")
    approval_timeout_seconds: int = Field(default=3600, ge=1, description="how long a run "
                                          "started from the Prefect UI waits for its approval "
                                          "(meterkeys approve RUN_ID) before it fails")
    storage_kek_label: str = "meterkeys-storage-kek"
    master_kek_label: str = "meterkeys-storage-kek-master"
    blob_mac_label: str = "meterkeys-blob-mac"
    audit_key_label: str = "meterkeys-audit-signing"
    audit_checkpoint_every: int = Field(default=10000, ge=1)
    witness_kind: Literal["file", "file+syslog"] = Field(
        default="file", description="where signed audit heads also go: the witness file, or "
                                    "the file and a syslog sink (verify reads the file)")
    witness_dir: Path | None = Field(default=None, description="folder of the audit witness "
                                     "file, outside the inventory (default: <home>/witness)")
    witness_syslog_address: str = Field(default="localhost:514", description="syslog sink of "
                                        "the witness: host:port (UDP) or a socket path")
    keep_so_pin: bool = Field(default=False, description="keep the generated SO PIN file after "
                                                         "token initialisation")
    simulation_home: Path | None = Field(default=None, description="files of the simulated "
                                         "manufacturers and meters (default: <home>-simulation)")
    hes: str | None = Field(default=None, pattern=r"^(file|simulated):.+$",
                            description="the Head End System the ownership claim talks to: "
                                        "file:<dir> (orders and outcomes as JSON lines in that "
                                        "folder) or simulated:<dir> (the simulator's HES)")
    claim_chunk_size: int = Field(default=4000, ge=1, le=20000, description="meters per chunk "
                                  "of an ownership claim (one HSM job and one transaction)")
    certify_chunk_size: int = Field(default=4000, ge=1, le=20000, description="claimed meters "
                                    "per chunk of the claim's certification (their requests "
                                    "checked and certificates issued over the HSM workers, "
                                    "recorded in one transaction)")
    dso_name: str = Field(default="meterkeys DSO", min_length=1, max_length=64,
                          description="the DSO's name: O= of every certificate it issues")
    pki_crl_base_url: str = Field(default="http://pki.invalid/crl/", description="where CRLs "
                                  "are published: each CA's is <base><CA name>-<generation>.crl")
    pki_publish_dir: Path | None = Field(default=None, description="folder the scheduled "
                                         "publish-crls run exports CA certificates and CRLs to "
                                         "(default: <home>/pki-publish)")
    root_token_label: str = Field(default="meterkeys-root", description="token of the offline "
                                  "root CA key; only the PKI ceremony opens it")
    root_pin_file: Path | None = Field(default=None, description="user PIN of the root token "
                                       "(default: <home>/secrets/root-user.pin); read by the "
                                       "PKI ceremony only")
    root_so_pin_file: Path | None = Field(default=None, description="SO PIN of the root token "
                                          "(default: <home>/secrets/root-so.pin); read by the "
                                          "PKI ceremony only, to create the token")

    # --- derived paths -------------------------------------------------------------------------
    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def secrets_dir(self) -> Path:
        return self.home_dir / "secrets"

    @property
    def witness_path(self) -> Path:
        """Return the audit witness's folder: configured, or ``<home>/witness``."""
        if self.witness_dir is not None:
            return self.witness_dir.expanduser().resolve()
        return self.home_dir / "witness"

    @property
    def publish_path(self) -> Path:
        """Return the PKI's publishing folder: configured, or ``<home>/pki-publish``."""
        if self.pki_publish_dir is not None:
            return self.pki_publish_dir.expanduser().resolve()
        return self.home_dir / "pki-publish"

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

    @property
    def simulation_dir(self) -> Path:
        """Return the simulated parties' directory: beside the home, never inside it.

        Raises:
            ConfigError: the configured simulation home lies inside the state directory.
        """
        home = self.home_dir
        sim = (self.simulation_home.expanduser().resolve() if self.simulation_home is not None
               else home.with_name(f"{home.name}-simulation"))
        if sim.is_relative_to(home):
            raise ConfigError(f"simulation home {sim} lies inside METERKEYS_HOME {home}: the "
                              "simulated manufacturers' and meters' secrets must live apart")
        return sim

    def kek_label(self, role: str) -> str:
        """Return the label of the storage KEK of a role (``policy.storage_kek_role``).

        Raises:
            ConfigError: no such role.
        """
        labels = {"storage-kek": self.storage_kek_label,
                  "storage-kek-master": self.master_kek_label}
        if role not in labels:
            raise ConfigError(f"no storage KEK role {role!r}")
        return labels[role]

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


PRIVATE_UMASK = 0o077


def private_umask() -> None:
    """Make every file and directory this process creates private to its owner (umask 077).

    Set at the edges (command line, task context, HSM workers): the token files, PIN files,
    SQLite inventory, backups and staged deliveries are all created by these processes.
    """
    os.umask(PRIVATE_UMASK)


def ensure_private_home(settings: Settings) -> Path:
    """Create the state directory with mode 0700 if absent; refuse one that others may use.

    Raises:
        ConfigError: the home exists but is not a directory, is not owned by this user, or
            grants any permission to group or others.
    """
    return ensure_private_dir(settings.home_dir, "METERKEYS_HOME")


def ensure_private_dir(path: Path, what: str) -> Path:
    """Create ``path`` (and missing parents) with mode 0700 if absent; refuse a shared one.

    Raises:
        ConfigError: ``path`` is not a directory, not owned by this user, or not 0700-tight.
    """
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; make it exact
    info = path.stat()
    if not path.is_dir():
        raise ConfigError(f"{what} {path} is not a directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{what} {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o077:
        raise ConfigError(f"{what} {path} is open to other users (mode "
                          f"{info.st_mode & 0o777:04o}); make it private: chmod 700 {path}")
    return path


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, with explicit overrides."""
    return Settings(**overrides)  # type: ignore[arg-type]
