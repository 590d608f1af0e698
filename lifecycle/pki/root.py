"""The offline root's side of a ceremony: jobs that run in a child process on the root token.

The ceremony (``lifecycle.pki.ceremony``) starts one spawned ``HsmWorkers`` process with the
root token's settings; that child loads the module, logs in to the root token with the root
PIN and runs these jobs; it exits when the ceremony ends. So the root token is never open in a
long-lived process, and the ceremony's own process never logs in to it. (A process that loaded
SoftHSM2 before the root token was created would not see it either: SoftHSM2 reads its slots at
``C_Initialize``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle.config import Settings
from lifecycle.hsm import keyring
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.templates import CA_KEY


@dataclass(frozen=True)
class RootKeyJob:
    """Make the root key unless the token holds it: label, curve, role of its pin."""

    label: str
    curve: str
    role: str


@dataclass(frozen=True)
class RootKey:
    """The root key as found or made: its pin, its public key (SPKI PEM), whether it is new."""

    pin: KeyPin
    public_pem: bytes
    created: bool


def ensure_root_key(settings: Settings, job: RootKeyJob) -> RootKey:
    """Return the root token's CA key, generating it (CA_KEY profile) if absent.

    A key already there (a ceremony that failed before storing the root certificate) must meet
    the CA key policy: generated in the token (CKA_LOCAL), always sensitive, never extractable.

    Raises:
        KeyPolicyError: a key under the label is duplicated or weaker than policy.
        HsmError: the token refused to create it.
    """
    with Hsm.open(settings).session() as hs:
        created = not hs.has_key(job.label, CA_KEY.object_class)
        if created:
            pin = hs.generate_ca_key(job.label, job.curve, job.role)
        else:
            pin = KeyPin(job.role, job.label, hs.key_id(job.label, CA_KEY),
                         hs.check_key(job.label, CA_KEY))
        return RootKey(pin, hs.public_key_pem(job.label), created)


@dataclass(frozen=True)
class RootSignJob:
    """Digests for the root key to sign, with the pin the key must match."""

    pin: KeyPin
    digests: tuple[bytes, ...]


def sign_with_root(settings: Settings, job: RootSignJob) -> list[bytes]:
    """Sign digests with the root key after checking it against its pin (CKA_ID, public key).

    Raises:
        KeyNotFound: the root token has no such key.
        KeyPolicyError: the key is not the pinned one or is weaker than policy.
    """
    keyring.trust([job.pin])
    with Hsm.open(settings).session() as hs:
        return hs.sign_digests(job.pin.label, job.digests)


__all__ = ["RootKey", "RootKeyJob", "RootSignJob", "ensure_root_key", "sign_with_root"]
