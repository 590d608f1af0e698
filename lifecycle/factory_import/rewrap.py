"""The import's HSM job: re-wrap a chunk's keys from the batch transport key to the storage KEK.

``run_rewrap`` runs on an HSM worker process (``lifecycle.hsm.pool``) or in this process. A
worker unwraps a batch's transport key once (RSA-OAEP under the vendor's import key) and keeps
the session object for the batch's later jobs; only wrapped keys cross the pipe.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from lifecycle.config import Settings
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.session import SessionKey

_TRANSPORT_CACHE = 4
# Transport keys of this process (a worker's, or the flow process's when it runs jobs itself).
_transports: OrderedDict[bytes, SessionKey] = OrderedDict()


@dataclass(frozen=True)
class RewrapJob:
    """Re-wrap keys from a batch transport key to the storage KEK.

    ``wrapped_transport_key`` is the transport key RSA-OAEP-wrapped under the vendor import key.
    """

    import_key_label: str
    oaep_hash: str
    wrapped_transport_key: bytes
    keys: Sequence[bytes]
    kek_label: str


def run_rewrap(settings: Settings, job: RewrapJob) -> list[bytes | None]:
    """Run a re-wrap job in this process; ``None`` marks a key whose integrity check failed.

    Raises:
        HsmError: the transport key does not unwrap, or the HSM fails as a whole.
    """
    with Hsm.open(settings).session() as session:
        token = hashlib.sha256(job.wrapped_transport_key + job.import_key_label.encode()).digest()
        transport = _transports.get(token)
        if transport is None or transport.destroyed:
            transport = session.unwrap_rsa_oaep(job.import_key_label, job.wrapped_transport_key,
                                                oaep_hash=job.oaep_hash)
            _transports[token] = transport
            while len(_transports) > _TRANSPORT_CACHE:
                session.destroy(_transports.popitem(last=False)[1])
        return session.rewrap(transport, job.keys, job.kek_label)


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
