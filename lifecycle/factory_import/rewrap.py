"""The import's HSM job: re-wrap a chunk's keys from the batch transport key to storage, sealed.

``run_rewrap`` runs on an HSM worker process (``lifecycle.hsm.pool``) or in this process. A
worker unwraps a batch's transport key once (RSA-OAEP under the vendor's import key) and keeps
the session object for the batch's later jobs. Each key is unwrapped from the transport key (the
RFC 3394 integrity check catches tampering), wrapped under the storage KEK of its key id
(``policy.storage_kek_role``), destroyed, and its blob is bound to its meter, key id, version and
KEK by an HSM MAC (``lifecycle.meter_keys.binding``). Only wrapped keys and MACs cross the pipe.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from lifecycle.config import Settings
from lifecycle.hsm.check import verify_pins
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.session import HsmSession, SessionKey
from lifecycle.meter_keys.binding import BlobContext, message
from lifecycle.policy import KeyId, storage_kek_role

_TRANSPORT_CACHE = 4
FACTORY_VERSION = 1
# Transport keys of this process (a worker's, or the flow process's when it runs jobs itself).
_transports: OrderedDict[bytes, SessionKey] = OrderedDict()
# Pin sets this process has verified against its own view of the token.
_verified: set[tuple[KeyPin, ...]] = set()


@dataclass(frozen=True)
class RewrapJob:
    """Re-wrap keys from a batch transport key to the storage KEKs, and bind them.

    ``keys`` are the vendor's wrapped keys, four per meter in key id order; ``meters`` the
    (serial, system title) of each meter, to bind its blobs to. Without ``meters`` (the
    verification probe) the blobs are made but not bound.
    """

    import_key_label: str
    oaep_hash: str
    wrapped_transport_key: bytes
    keys: Sequence[bytes]
    meters: Sequence[tuple[str, str]] = ()
    pins: tuple[KeyPin, ...] = ()


@dataclass(frozen=True)
class Sealed:
    """A key in custody: its blob, the storage KEK it is under, and the MAC that binds it."""

    blob: bytes
    kek_label: str
    mac: bytes | None


def run_rewrap(settings: Settings, job: RewrapJob) -> list[Sealed | None]:
    """Run a re-wrap job in this process; ``None`` marks a key whose integrity check failed.

    Raises:
        HsmError: the transport key does not unwrap, or the HSM fails as a whole.
    """
    per_meter = len(KeyId)
    targets = [settings.kek_label(storage_kek_role(KeyId(i % per_meter)))
               for i in range(len(job.keys))]
    _verify_once(settings, job.pins)
    with Hsm.open(settings).session() as session:
        transport = _transport(session, job)
        blobs = session.rewrap(transport, job.keys, targets)
        if not job.meters:
            return [None if b is None else Sealed(b, t, None)
                    for b, t in zip(blobs, targets, strict=True)]
        bound = [i for i, b in enumerate(blobs) if b is not None]
        messages = [message(_context(job, i, targets[i]), blobs[i] or b"") for i in bound]
        macs = dict(zip(bound, session.mac(settings.blob_mac_label, messages), strict=True))
    return [None if b is None else Sealed(b, t, macs[i])
            for i, (b, t) in enumerate(zip(blobs, targets, strict=True))]


def _verify_once(settings: Settings, pins: tuple[KeyPin, ...]) -> None:
    if pins and pins not in _verified:
        verify_pins(settings, pins)
        _verified.add(pins)


def _context(job: RewrapJob, index: int, kek_label: str) -> BlobContext:
    serial, title = job.meters[index // len(KeyId)]
    return BlobContext(serial, title, index % len(KeyId), FACTORY_VERSION, kek_label)


def _transport(session: HsmSession, job: RewrapJob) -> SessionKey:
    token = hashlib.sha256(job.wrapped_transport_key + job.import_key_label.encode()).digest()
    transport = _transports.get(token)
    if transport is None or transport.destroyed:
        transport = session.unwrap_rsa_oaep(job.import_key_label, job.wrapped_transport_key,
                                            oaep_hash=job.oaep_hash)
        _transports[token] = transport
        while len(_transports) > _TRANSPORT_CACHE:
            session.destroy(_transports.popitem(last=False)[1])
    return transport


def forget_transport_keys(settings: Settings) -> None:
    """Destroy this process's cached transport keys (at the end of a batch)."""
    if not _transports:
        return
    with Hsm.open(settings).session() as session:
        while _transports:
            session.destroy(_transports.popitem()[1])


def cached_transport_keys() -> int:
    """Return how many transport keys this process holds as session objects."""
    return sum(1 for key in _transports.values() if not key.destroyed)
