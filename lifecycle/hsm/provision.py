"""Token provisioning: SoftHSM2 configuration, token initialisation, PIN files, long-lived keys.

python-pkcs11 has no ``C_InitToken``, and ``softhsm2-util`` takes PINs only on its command line
(visible to every local user in /proc) or from a terminal. So a token is initialised in a
short-lived child process that calls the module's ``C_InitToken`` and ``C_InitPIN`` through
ctypes and reads both PINs from its standard input. The child loads the module itself, so the
parent's own PKCS#11 state is untouched.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lifecycle.config import Settings, ensure_private_home
from lifecycle.errors import ConfigError, KeyPolicyError, PermanentHsmError
from lifecycle.hsm import keyring
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.session import HsmSession

CKF_SERIAL_SESSION = 0x4
CKF_RW_SESSION = 0x2
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
TOKEN_INFO_FLAGS_OFFSET = 96  # label[32] manufacturerID[32] model[16] serialNumber[16]

AUDIT_CURVE = "P-256"


def softhsm_conf_text(token_dir: Path) -> str:
    """Return the SoftHSM2 configuration of a token directory (object files private: 0077)."""
    return (f"directories.tokendir = {token_dir}\n"
            "objectstore.backend = file\n"
            "objectstore.umask = 0077\n"
            "log.level = ERROR\n"
            "slots.removable = false\n")


def write_softhsm_conf(settings: Settings) -> Path:
    """Write the SoftHSM2 configuration for the embedded token directory, if absent."""
    conf = settings.softhsm_conf_path
    settings.token_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.token_dir, 0o700)
    if not conf.exists():
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(softhsm_conf_text(settings.token_dir), encoding="utf-8")
    return conf


def write_private(path: Path, data: bytes) -> None:
    """Create a file readable by its owner only and write ``data`` durably (fsync).

    Raises:
        FileExistsError: the file exists (it is never overwritten).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def token_exists(settings: Settings) -> bool:
    """Return whether an initialised token with the configured label exists (child process)."""
    result = _run_child(settings, "probe", "")
    return result.strip() == "present"


def init_token(settings: Settings) -> bool:
    """Initialise the token with the configured label unless it exists; return True if created.

    Raises:
        ConfigError: PINs missing or placeholders.
        PermanentHsmError: the module refused to initialise a token.
    """
    if settings.is_softhsm:
        write_softhsm_conf(settings)
    if token_exists(settings):
        discard_so_pin(settings)
        return False
    pins = f"{settings.so_pin_value()}\n{settings.user_pin()}\n"
    _run_child(settings, "init", pins)
    discard_so_pin(settings)
    return True


def generated_so_pin_file(settings: Settings) -> Path | None:
    """Return the SO PIN file that ``generate_pin_files`` makes, unless the user chose the PIN.

    An SO PIN from the environment or from a configured file is the user's own and left alone.
    """
    if settings.so_pin is not None or settings.so_pin_file is not None:
        return None
    return settings.secrets_dir / "so.pin"


def discard_so_pin(settings: Settings) -> bool:
    """Remove the generated SO PIN file unless ``keep_so_pin``; return whether one was removed.

    The SO PIN is needed only to initialise the token (C_InitToken, C_InitPIN): kept on the
    disk of every host that runs meterkeys it would let anyone who reads the home re-initialise
    the token or reset the user PIN. A plain unlink: overwriting first is not meaningful on SSDs
    and journaling or copy-on-write file systems, which write the new bytes elsewhere.
    """
    path = generated_so_pin_file(settings)
    if settings.keep_so_pin or path is None or not path.exists():
        return False
    path.unlink()
    return True


def _run_child(settings: Settings, command: str, stdin: str) -> str:
    env = dict(os.environ)
    if settings.is_softhsm:
        env["SOFTHSM2_CONF"] = str(settings.softhsm_conf_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lifecycle.hsm.provision", command, str(settings.module_path),
         settings.token_label],
        input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no reason"
        raise PermanentHsmError(f"token {command}", reason, settings.token_label)
    return proc.stdout


# --- child side: ctypes against the module's exported C_* functions ------------------------------
class _Module:
    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        self.call("C_Initialize", None)

    def call(self, name: str, *args: object) -> None:
        rv = getattr(self.lib, name)(*args)
        if rv != 0:
            raise SystemExit(f"{name} returned CKR 0x{rv:x}")

    def slots(self) -> list[int]:
        count = ctypes.c_ulong(0)
        self.call("C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(count))
        array = (ctypes.c_ulong * max(count.value, 1))()
        self.call("C_GetSlotList", ctypes.c_ubyte(1), array, ctypes.byref(count))
        return list(array[: count.value])

    def token_info(self, slot: int) -> tuple[str, int]:
        buf = ctypes.create_string_buffer(512)
        self.call("C_GetTokenInfo", ctypes.c_ulong(slot), buf)
        label = buf.raw[:32].decode("utf-8", "replace").rstrip()
        flags = ctypes.c_ulong.from_buffer(buf, TOKEN_INFO_FLAGS_OFFSET).value
        return label, flags

    def find(self, label: str) -> int | None:
        for slot in self.slots():
            name, flags = self.token_info(slot)
            if flags & CKF_TOKEN_INITIALIZED and name == label:
                return slot
        return None

    def free_slot(self) -> int:
        for slot in self.slots():
            if not self.token_info(slot)[1] & CKF_TOKEN_INITIALIZED:
                return slot
        raise SystemExit("no free slot for a new token")


def _child_main(argv: list[str]) -> None:
    command, module_path, label = argv
    module = _Module(module_path)
    if command == "probe":
        print("present" if module.find(label) is not None else "absent")
        return
    so_pin = sys.stdin.readline().rstrip("\n").encode()
    user_pin = sys.stdin.readline().rstrip("\n").encode()
    padded = label.encode().ljust(32, b" ")[:32]
    slot = module.free_slot()
    module.call("C_InitToken", ctypes.c_ulong(slot), so_pin, ctypes.c_ulong(len(so_pin)), padded)
    found = module.find(label)
    if found is None:
        raise SystemExit("token not found after initialisation")
    session = ctypes.c_ulong(0)
    module.call("C_OpenSession", ctypes.c_ulong(found),
                ctypes.c_ulong(CKF_SERIAL_SESSION | CKF_RW_SESSION), None, None,
                ctypes.byref(session))
    module.call("C_Login", session, ctypes.c_ulong(CKU_SO), so_pin, ctypes.c_ulong(len(so_pin)))
    module.call("C_InitPIN", session, user_pin, ctypes.c_ulong(len(user_pin)))
    module.call("C_Logout", session)
    module.call("C_CloseSession", session)
    module.call("C_Finalize", None)


@dataclass(frozen=True)
class KeyState:
    """A long-lived key after ``ensure_keys``: "created" or "present", and its pin."""

    role: str
    state: str
    pin: KeyPin


def ensure_keys(settings: Settings, refuse: Mapping[str, str] | None = None) -> list[KeyState]:
    """Create the long-lived keys that are missing; check those present; return every pin.

    The storage KEK, the master KEK, the blob MAC key and the audit key. A present key must
    meet its policy (``lifecycle.hsm.templates``). ``refuse`` maps a role to the reason it must
    not be created (the inventory holds blobs or a pin for it: a new KEK would orphan them).

    Raises:
        KeyPolicyError: a present key is weaker than policy or duplicated, or a refused role's
            key is missing.
        HsmError: the token refused to create a key.
    """
    refuse = refuse or {}
    out = []
    with Hsm.open(settings).session() as s:
        for role, label in keyring.role_labels(settings).items():
            kind = keyring.kind_of_role(role)
            if s.has_key(label, kind.object_class):
                out.append(KeyState(role, "present", KeyPin(role, label, s.key_id(label, kind),
                                                             s.check_key(label, kind))))
                continue
            if role in refuse:
                raise KeyPolicyError(kind.name, label, f"missing from the token, and "
                                                       f"{refuse[role]}: restore a backup")
            out.append(KeyState(role, "created", _generate(s, role, label)))
    return out


def _generate(s: HsmSession, role: str, label: str) -> KeyPin:
    if role == "storage-kek":
        return s.generate_storage_kek(label)
    if role == "storage-kek-master":
        return s.generate_storage_kek(label, master=True)
    if role == "blob-mac":
        return s.generate_mac_key(label)
    return s.generate_token_ec(label, AUDIT_CURVE)


def ensure_long_lived_keys(settings: Settings) -> dict[str, str]:
    """Create the missing long-lived keys; report label -> "created" or "present".

    Raises:
        KeyPolicyError: a present key is weaker than policy.
        HsmError: the token refused to create a key.
    """
    return {state.pin.label: state.state for state in ensure_keys(settings)}


def generate_pin_files(settings: Settings) -> list[Path]:
    """Create random SO and user PIN files (mode 0600) for the embedded token, if absent.

    The SO PIN file is made only together with the user PIN file, for a new token: once the
    token exists, a fresh SO PIN would not be its PIN. ``init_token`` removes it after use
    unless ``keep_so_pin`` (``discard_so_pin``).

    Raises:
        ConfigError: the home or the secrets directory cannot be made private.
    """
    ensure_private_home(settings)
    settings.secrets_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(settings.secrets_dir, 0o700)
    made = []
    fresh = not (settings.secrets_dir / "user.pin").exists()
    for name in ("so.pin", "user.pin"):
        path = settings.secrets_dir / name
        if path.exists() or (name == "so.pin" and not fresh):
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_urlsafe(24))
        made.append(path)
    if settings.secrets_dir.stat().st_mode & 0o077:
        raise ConfigError(f"{settings.secrets_dir} must not be readable by others")
    return made


if __name__ == "__main__":
    _child_main(sys.argv[1:])
