"""The PKCS#11 boundary: one call lock per process, and errors translated as they cross it.

python-pkcs11 calls ``C_Initialize(NULL)``, which tells the module that no two threads call it
at once, and SoftHSM2 then switches its own locking off (shared reference "pkcs11.md" §1). So
every PKCS#11 call of this process goes through one lock, whatever threads the caller uses.

PKCS#11 exceptions are translated here into ``TransientHsmError`` (retry) or
``PermanentHsmError`` (do not) and go no further.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator

from pkcs11 import exceptions as px

from lifecycle.errors import IntegrityError, KeyNotFound, PermanentHsmError, TransientHsmError

CALL_LOCK = threading.RLock()

TRANSIENT = (
    px.SessionClosed,
    px.SessionHandleInvalid,
    px.SessionCount,
    px.DeviceError,
    px.DeviceMemory,
    px.DeviceRemoved,
    px.TokenNotPresent,
    px.HostMemory,
    px.FunctionFailed,
    px.OperationActive,
)
INTEGRITY = (
    px.WrappedKeyInvalid,
    px.WrappedKeyLenRange,
    px.EncryptedDataInvalid,
    px.EncryptedDataLenRange,
    px.SignatureInvalid,
    px.DataInvalid,
)
# SoftHSM2 answers an AES key-wrap integrity failure with CKR_GENERAL_ERROR. Calls are
# serialised, so on an unwrap it means the check failed, not a concurrency fault.
UNWRAP_FAILED = (*INTEGRITY, px.GeneralError)


@contextlib.contextmanager
def translated(operation: str, label: str | None = None) -> Iterator[None]:
    """Serialise the enclosed PKCS#11 calls and translate their errors at the boundary.

    Raises:
        KeyNotFound, IntegrityError, TransientHsmError, PermanentHsmError: by the PKCS#11 cause.
    """
    try:
        with CALL_LOCK:
            yield
    except px.NoSuchKey:
        raise KeyNotFound(operation, "no such key", label) from None
    except INTEGRITY as exc:
        raise IntegrityError(operation, type(exc).__name__, label) from None
    except TRANSIENT as exc:
        raise TransientHsmError(operation, type(exc).__name__, label) from None
    except px.PKCS11Error as exc:
        raise PermanentHsmError(operation, cause_of(exc), label) from None


# PKCS#11 v2.40/3.0 return values that python-pkcs11 0.10.1 maps to no class of its own (or that
# the ctypes path in ``lifecycle.hsm.native`` reports), named for messages.
CKR_NAMES: dict[int, str] = {
    0x10: "CKR_ATTRIBUTE_READ_ONLY", 0x12: "CKR_ATTRIBUTE_TYPE_INVALID",
    0x13: "CKR_ATTRIBUTE_VALUE_INVALID", 0x1B: "CKR_ACTION_PROHIBITED",
    0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED", 0x69: "CKR_KEY_NOT_WRAPPABLE",
    0x6A: "CKR_KEY_UNEXTRACTABLE", 0x70: "CKR_MECHANISM_INVALID",
    0x101: "CKR_USER_NOT_LOGGED_IN", 0xD0: "CKR_TEMPLATE_INCOMPLETE",
    0xD1: "CKR_TEMPLATE_INCONSISTENT",
}


def ckr_name(rv: int) -> str:
    """Return ``CKR_NAME (0xNN)`` for a PKCS#11 return value."""
    return f"{CKR_NAMES.get(rv, 'CKR_VENDOR_OR_UNKNOWN')} (0x{rv:X})"


def cause_of(exc: px.PKCS11Error) -> str:
    """Name a python-pkcs11 exception; an unmapped code (e.g. 0x1B) is named by its CKR."""
    if type(exc) is px.PKCS11Error and exc.args:
        match = re.search(r"0x([0-9a-fA-F]+)", str(exc.args[0]))
        if match:
            return ckr_name(int(match.group(1), 16))
    return type(exc).__name__
