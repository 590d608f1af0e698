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
from pathlib import Path

from lifecycle.config import Settings
from lifecycle.errors import ConfigError, PermanentHsmError
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import ObjectClass

CKF_SERIAL_SESSION = 0x4
CKF_RW_SESSION = 0x2
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
TOKEN_INFO_FLAGS_OFFSET = 96  # label[32] manufacturerID[32] model[16] serialNumber[16]

# Long-lived keys that `meterkeys hsm init` creates: label setting -> kind.
STORAGE_KEK_BITS = 256
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
        return False
    pins = f"{settings.so_pin_value()}\n{settings.user_pin()}\n"
    _run_child(settings, "init", pins)
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


def ensure_long_lived_keys(settings: Settings) -> dict[str, str]:
    """Create the storage KEK and the audit signing key if absent; report what was done.

    Raises:
        HsmError: the token refused to create a key.
    """
    report: dict[str, str] = {}
    with Hsm.open(settings).session() as s:
        if s.has_key(settings.storage_kek_label):
            report[settings.storage_kek_label] = "present"
        else:
            s.generate_token_aes(settings.storage_kek_label, STORAGE_KEK_BITS)
            report[settings.storage_kek_label] = "created"
        if s.has_key(settings.audit_key_label, ObjectClass.PRIVATE_KEY):
            report[settings.audit_key_label] = "present"
        else:
            s.generate_token_ec(settings.audit_key_label, AUDIT_CURVE)
            report[settings.audit_key_label] = "created"
    return report


def generate_pin_files(settings: Settings) -> list[Path]:
    """Create random SO and user PIN files (mode 0600) for the embedded token, if absent.

    Raises:
        ConfigError: the secrets directory cannot be made private.
    """
    settings.secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.secrets_dir, 0o700)
    made = []
    for name in ("so.pin", "user.pin"):
        path = settings.secrets_dir / name
        if path.exists():
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
