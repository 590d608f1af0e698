"""The PKCS#11 boundary: one call lock per process, and errors translated as they cross it.

python-pkcs11 calls ``C_Initialize(NULL)``, which tells the module that no two threads call it
at once, and SoftHSM2 then switches its own locking off (shared reference "pkcs11.md" §1). So
every PKCS#11 call of this process goes through one lock, whatever threads the caller uses.

PKCS#11 exceptions are translated here into ``TransientHsmError`` (retry) or
``PermanentHsmError`` (do not) and go no further.
"""

from __future__ import annotations

import contextlib
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
        raise PermanentHsmError(operation, type(exc).__name__, label) from None
