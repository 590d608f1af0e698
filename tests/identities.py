"""Principals with keys for tests: one inventory's security officers, operator and auditor.

Keys are unencrypted P-256 (one Ed25519, for variety) PEM files in a test's own folder; the
anchor lives in the settings' witness folder, so each test inventory needs a witness folder of
its own (the ``fleet`` fixture gives it one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.identity import request, signers
from lifecycle.identity.request import SignedRequest
from lifecycle.identity.signers import FileSigner
from lifecycle.inventory.db import Engine

ROOT, SECOND, OPERATOR, AUDITOR = "test-so", "test-so-2", "test-operator", "test-auditor"
KINDS: dict[str, Literal["p256", "ed25519"]] = {ROOT: "p256", SECOND: "ed25519",
                                                OPERATOR: "p256", AUDITOR: "p256"}


class Identities:
    """Principals of one test inventory, with their keys in ``key_dir``."""

    def __init__(self, settings: Settings, engine: Engine, key_dir: Path) -> None:
        self.settings = settings
        self.engine = engine
        self.key_dir = key_dir
        self._signers: dict[str, FileSigner] = {}

    def keygen(self, name: str, kind: Literal["p256", "ed25519"] = "p256") -> FileSigner:
        """Make (once) and return the key of ``name``; it is not enrolled by this."""
        if name not in self._signers:
            key_path, _ = signers.generate(self.key_dir, name, kind, None)
            self._signers[name] = FileSigner.load(key_path, None)
        return self._signers[name]

    def signer(self, name: str) -> FileSigner:
        """Return the key of a principal made here."""
        return self._signers[name]

    def key_path(self, name: str) -> Path:
        """Return the private key file of a principal made here."""
        return self.key_dir / f"{name}.key.pem"

    def bootstrap(self) -> None:
        """Enrol the root SO (self-signed), the second SO (by the root alone), then the
        operator and the auditor (by both SOs)."""
        root = self.keygen(ROOT, KINDS[ROOT])
        params = principals.enrolment_params(ROOT, principals.SECURITY_OFFICER,
                                             root.public_key_pem())
        signed = self.sign(ROOT, principals.ENROL, params)
        principals.enrol_root(self.engine, self.settings, signed, root.public_key_pem(),
                              at=utcnow())
        self.enrol(SECOND, principals.SECURITY_OFFICER, by=[ROOT], kind=KINDS[SECOND])
        self.enrol(OPERATOR, principals.OPERATOR, kind=KINDS[OPERATOR])
        self.enrol(AUDITOR, principals.AUDITOR, kind=KINDS[AUDITOR])

    def enrol(self, name: str, role: str, *, by: Sequence[str] = (ROOT, SECOND),
              kind: Literal["p256", "ed25519"] = "p256") -> Actor:
        """Make a key for ``name`` and enrol it with ``role``, signed by ``by``."""
        pem = self.keygen(name, kind).public_key_pem()
        params = principals.enrolment_params(name, role, pem)
        signed = [self.sign(who, principals.ENROL, params) for who in by]
        return principals.enrol(self.engine, self.settings, signed, name, role, pem,
                                at=utcnow())

    def sign(self, name: str, action: str, params: Mapping[str, Any],
             at: datetime | None = None) -> SignedRequest:
        """Return a request for ``action`` on ``params`` signed by ``name``."""
        return request.make(action, params, name, principals.installation_id(self.engine),
                            at or utcnow(), self._signers[name])

    def requests(self, names: Sequence[str], action: str, params: Mapping[str, Any]) -> str:
        """Return requests signed by each of ``names``, encoded (as a flow parameter)."""
        return request.encode([self.sign(name, action, params) for name in names])

    def authorize(self, names: Sequence[str], action: str, params: Mapping[str, Any]) -> Actor:
        """Authorize ``action`` on ``params`` with requests signed by each of ``names``."""
        signed = [self.sign(name, action, params) for name in names]
        return principals.authorize(self.engine, self.settings, signed, action, params,
                                    at=utcnow())
