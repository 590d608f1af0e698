"""The project's errors: one hierarchy, one root, every member picklable.

    MeterkeysError
    ├── ConfigError                 settings missing or unsafe (placeholder PIN, no module)
    │   └── TokenBusy               the token lock was not obtained in time
    ├── HsmError                    raised at the PKCS#11 boundary, never a pkcs11 exception
    │   ├── TransientHsmError       worth a retry: session closed, device busy, worker died
    │   └── PermanentHsmError       do not retry: wrong PIN, missing key, bad mechanism
    │       ├── KeyNotFound         no object with that label
    │       ├── IntegrityError      an unwrap or signature check failed (tampering, wrong key)
    │       └── KeyPolicyError      a long-lived key missing, substituted or weaker than policy
    ├── InventoryError              a database constraint or state rule was broken
    ├── AccessDenied                the principal's role may not perform the operation
    │   └── RequestError            a signed request is malformed, stale, for something else,
    │       │                       or does not verify (names the field or the principal)
    │       └── ReplayedRequest     a signed request's nonce was used before
    ├── AuditError                  the audit trail is broken (names the first bad event)
    ├── BackupError                 a token backup is unusable or a restore was refused
    ├── PkiError                    a CA, certificate or CRL cannot be made or used (names it)
    │   └── FactoryTrustError       a meter's factory certificate does not verify (names the
    │                               meter and the reason)
    ├── DlmsError                   DLMS data is malformed (names the field and byte offset)
    │   ├── CounterReplayed         an invocation counter at or below the last one seen
    │   └── ProofRefused            a meter's proof of possession does not hold
    ├── PortError                   a HES file or message is malformed (names file and line)
    ├── ClaimError                  a meter cannot be claimed, or an outcome cannot be settled
    └── BatchError                  a factory batch as a whole is unacceptable
        ├── ManifestError           missing, malformed or badly signed manifest
        └── ChecksumError           the file is not the one the manifest describes

Every error names what failed (meter, key label, file, row, field). None carries key material,
PINs or wrapped key bytes: messages end up in Prefect's database and logs.

Errors cross process boundaries (an HSM worker raises, the task that waits for it handles), so
the root pickles every error by its message and fields rather than by its constructor's
arguments: a permanent error raised in a worker reaches the parent as that permanent error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _rebuild(cls: type[MeterkeysError], args: tuple[Any, ...],
             state: dict[str, Any]) -> MeterkeysError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class MeterkeysError(Exception):
    """Root of every error this project raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class ConfigError(MeterkeysError):
    """Settings are missing, malformed or unsafe."""


class TokenBusy(ConfigError):
    """The token lock was not obtained in time: some process holds the token open."""

    def __init__(self, token_dir: Path, exclusive: bool, timeout: float) -> None:
        self.token_dir = token_dir
        what = ("a process holds the token open (stop workers, flows and CLI sessions using it)"
                if exclusive else "a backup or restore of the token is running")
        super().__init__(f"token directory {token_dir} is locked: {what}; "
                         f"gave up after {timeout:g} s")


class HsmError(MeterkeysError):
    """An HSM operation failed; the PKCS#11 cause is named, never re-raised."""

    def __init__(self, operation: str, cause: str, label: str | None = None) -> None:
        self.operation = operation
        self.cause = cause
        self.label = label
        where = f" on key {label!r}" if label else ""
        super().__init__(f"HSM {operation}{where} failed: {cause}")


class TransientHsmError(HsmError):
    """A failure that a retry may cure (session closed, device busy, worker lost)."""


class PermanentHsmError(HsmError):
    """A failure that a retry will not cure."""


class KeyNotFound(PermanentHsmError):
    """No key with the label exists on the token."""


class IntegrityError(PermanentHsmError):
    """An unwrap integrity check or signature verification failed."""


class KeyPolicyError(PermanentHsmError):
    """A long-lived key is missing, duplicated, substituted, or weaker than policy."""

    def __init__(self, key: str, label: str, reason: str) -> None:
        self.operation = "key check"
        self.cause = reason
        self.label = label
        self.key = key
        Exception.__init__(self, f"{key} {label!r}: {reason}")


class InventoryError(MeterkeysError):
    """A database rule was broken (duplicate, unknown record, illegal state change)."""


class AccessDenied(MeterkeysError):
    """The principal's role does not allow the operation (``reason`` says why, when known)."""

    def __init__(self, principal: str, role: str | None, action: str,
                 reason: str | None = None) -> None:
        self.principal = principal
        self.role = role
        self.action = action
        self.reason = reason
        why = f": {reason}" if reason else ""
        super().__init__(
            f"principal {principal!r} (role {role or 'none'}) may not perform {action!r}{why}"
        )


class RequestError(AccessDenied):
    """A signed request is refused for what it is: malformed, stale, signed for other
    parameters or another installation, or its signature or signer does not verify.

    ``where`` names what failed (a request's field, a principal); the message never holds a
    signature or key.
    """

    def __init__(self, where: str, reason: str, *, principal: str = "",
                 action: str = "") -> None:
        self.principal = principal
        self.role = None
        self.action = action
        self.reason = reason
        self.where = where
        Exception.__init__(self, f"{where}: {reason}")


class ReplayedRequest(RequestError):
    """A signed request's nonce was used before: the request was already accepted once."""


class AuditError(MeterkeysError):
    """The audit trail fails verification at a named event."""

    def __init__(self, seq: int | None, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        at = f"event {seq}" if seq is not None else "audit trail"
        super().__init__(f"{at}: {reason}")


class BackupError(MeterkeysError):
    """A backup is unusable, or a restore was refused; names the file or the failed check."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class PkiError(MeterkeysError):
    """A CA, certificate or CRL cannot be made, found or used; ``what`` names it."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class FactoryTrustError(PkiError):
    """A meter's factory certificate does not verify against its vendor's factory CAs."""

    def __init__(self, meter: str, reason: str) -> None:
        self.meter = meter
        self.what = f"meter {meter}"
        self.reason = reason
        Exception.__init__(self, f"meter {meter}: factory certificate refused: {reason}")


class DlmsError(MeterkeysError):
    """DLMS data is malformed or refused; ``where`` names what (field, offset, meter)."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


class CounterReplayed(DlmsError):
    """An invocation counter is at or below the last one seen for its key (a replay)."""


class ProofRefused(DlmsError):
    """A meter's answer does not prove that it holds the key it was asked to prove."""


class PortError(MeterkeysError):
    """A HES file or message is malformed; names the file and line (or the order)."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


class ClaimError(MeterkeysError):
    """A meter cannot be claimed, or an outcome cannot be settled; ``what`` names which."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class BatchError(MeterkeysError):
    """A factory batch file is rejected as a whole; nothing of it is imported."""

    def __init__(self, file: str, reason: str) -> None:
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")


class ManifestError(BatchError):
    """The batch manifest is missing, malformed, or its signature does not verify."""


class ChecksumError(BatchError):
    """The batch file's SHA-256 or record count differs from the manifest."""
