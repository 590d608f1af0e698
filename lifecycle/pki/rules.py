"""Decisions of the PKI, pure: what a ceremony makes, CRL numbers and entries, which CA
certificates to trust.

A ceremony makes every CA that does not exist yet (generation 1) and renews an online sub-CA
(generation n + 1: a new key and a new certificate; the old one is retired but stays valid
until it expires, and keeps signing its CRL) when asked to, once its issuing period is over
(``policy.CA_ISSUING_PERIOD``, NIST SP 800-57 Part 1 §5.3.6), or when its newest generation is
revoked. A renewal never revokes the older generation: only ``--revoke`` does. The root is
never renewed here.

The inventory is writable by more hands than the audit trail is rewritable (the trail is
anchored by signed, witnessed checkpoints), so what the PKI publishes is checked against the
trail's word: each CA certificate must be the one a ceremony certified (its serial, and for
the root the SHA-256 of its SubjectPublicKeyInfo), a revocation the trail records stays on the
CRL whatever the inventory says, and a CRL number already audited is never issued again.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from lifecycle import policy
from lifecycle.errors import PkiError
from lifecycle.pki import profiles

CERTIFY, CA_REVOKE, REVOKE, CRL_ISSUE = (
    "pki.ca.certify", "pki.ca.revoke", "pki.certificate.revoke", "pki.crl.issue")
TRAIL_ACTIONS = (CERTIFY, CA_REVOKE, REVOKE, CRL_ISSUE)
# Reasons a ceremony may give for revoking a sub-CA (RFC 5280 §5.3.1).
CA_REASONS = ("key-compromise", "ca-compromise", "superseded")


@dataclass(frozen=True)
class CaState:
    """A CA's newest active generation as the inventory holds it."""

    name: str
    generation: int
    not_before: datetime
    revoked: bool = False


def ceremony_plan(current: Mapping[str, CaState | None], renew: Collection[str],
                  now: datetime) -> dict[str, int]:
    """Return CA name -> generation to make now, root first; empty if nothing is due.

    Raises:
        PkiError: ``renew`` names the root or an unknown CA, or a CA that does not exist yet
            is asked to be renewed while the root is missing (nothing to renew).
    """
    for name in renew:
        if name == profiles.ROOT:
            raise PkiError("CA root", "the root is not renewed by a ceremony: a new root is a "
                                      "new PKI")
        profiles.profile(name)
    plan: dict[str, int] = {}
    for name in profiles.CAS:
        state = current.get(name)
        if state is None:
            plan[name] = 1
        elif name in renew or state.revoked or (
                name != profiles.ROOT and now >= state.not_before + policy.CA_ISSUING_PERIOD):
            plan[name] = state.generation + 1
    return plan


def parse_ca_revocations(given: Iterable[str], reason: str) -> list[tuple[str, int]]:
    """Return the (CA, generation) pairs of ``<ca>:<generation>`` texts a ceremony revokes.

    Raises:
        PkiError: a malformed pair, the root, an unknown CA, or a reason not for a CA.
    """
    if reason not in CA_REASONS:
        raise PkiError(f"revocation reason {reason!r}", f"a CA is revoked for one of "
                                                        f"{', '.join(CA_REASONS)}")
    out = []
    for text in given:
        name, _, number = text.partition(":")
        if not number.isdigit() or int(number) < 1:
            raise PkiError(f"CA revocation {text!r}", "write it <ca>:<generation>, e.g. "
                                                      "device-p256:1")
        if profiles.profile(name).name == profiles.ROOT:
            raise PkiError("CA root", "the root is not revoked: a new root is a new PKI")
        out.append((name, int(number)))
    return sorted(set(out))


# --- what the audit trail says ----------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One successful PKI event of the audit trail: its action, time and detail."""

    action: str
    at: datetime
    detail: Mapping[str, Any]

    def names(self) -> tuple[str, int] | None:
        """Return the (CA, generation) the event is about, if it names one."""
        ca, generation = self.detail.get("ca"), self.detail.get("generation")
        if isinstance(ca, str) and isinstance(generation, int):
            return ca, generation
        return None


@dataclass(frozen=True)
class Certified:
    """A CA certificate as the ceremony that made it audited it."""

    serial: str  # profiles.serial_b64
    spki_sha256: str | None  # spki_digest; absent on certifications audited before it was


def spki_digest(cert: x509.Certificate) -> str:
    """Return the SHA-256 of a certificate's SubjectPublicKeyInfo as unpadded base64url (the
    trail refuses 32 or more hex digits in a row)."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def certified(events: Iterable[Event]) -> dict[tuple[str, int], Certified]:
    """Return each CA generation's first certification in the trail.

    The first one counts: a later event appended by a database writer cannot displace it, and
    rewriting it breaks the chain against the witnessed checkpoints (``meterkeys audit
    verify``).
    """
    out: dict[tuple[str, int], Certified] = {}
    for event in events:
        named = event.names()
        if event.action == CERTIFY and named and named not in out:
            spki = event.detail.get("spki_sha256")
            out[named] = Certified(str(event.detail.get("serial")),
                                   spki if isinstance(spki, str) else None)
    return out


def revoked_cas(events: Iterable[Event]) -> dict[tuple[str, int], profiles.Revoked]:
    """Return the CA generations the trail says a ceremony revoked, with their CRL entry."""
    out = {}
    for event in events:
        named = event.names()
        if event.action == CA_REVOKE and named:
            out[named] = _entry(event)
    return out


def revocations(events: Iterable[Event], ca: str, generation: int) -> dict[int, profiles.Revoked]:
    """Return serial -> CRL entry of the certificates the trail says were revoked under one
    CA generation."""
    out = {}
    for event in events:
        if event.action == REVOKE and event.names() == (ca, generation):
            entry = _entry(event)
            out[entry.serial] = entry
    return out


def _entry(event: Event) -> profiles.Revoked:
    serial = int.from_bytes(base64.urlsafe_b64decode(str(event.detail["serial"]) + "="), "big")
    return profiles.Revoked(serial, event.at,
                            profiles.reason(str(event.detail.get("reason", "unspecified"))))


def last_audited_crl(events: Iterable[Event], ca: str, generation: int) -> int | None:
    """Return the highest CRL number the trail records for a CA generation."""
    numbers = [int(e.detail["number"]) for e in events
               if e.action == CRL_ISSUE and e.names() == (ca, generation)
               and isinstance(e.detail.get("number"), int)]
    return max(numbers, default=None)


# --- CRLs -------------------------------------------------------------------------------------
def next_crl_number(last: int | None, audited: int | None = None) -> int:
    """Return the number of the next CRL of a CA generation: one more than the greater of the
    inventory's last and the trail's last, so that a CRL row deleted from the inventory never
    lets a published number be issued again (RFC 5280 §5.2.3: increasing)."""
    return max((n for n in (last, audited) if n is not None), default=0) + 1


def crl_entries(stored: Sequence[profiles.Revoked], audited: Mapping[int, profiles.Revoked],
                expired: Collection[int]) -> tuple[list[profiles.Revoked], list[int]]:
    """Return a CRL's entries and the serials that only the trail revokes.

    A revocation is final (RFC 5280 §3.3; this PKI never puts a certificate on hold): one the
    trail records but the inventory lost goes on the CRL anyway, unless the inventory shows the
    certificate expired. The caller audits the serials returned second.
    """
    entries = {e.serial: e for e in stored}
    lost = sorted(s for s in audited if s not in entries and s not in expired)
    entries.update({s: audited[s] for s in lost})
    return sorted(entries.values(), key=lambda e: e.serial), lost


def crl_due(this_update: datetime | None, next_update: datetime | None, now: datetime) -> bool:
    """Return whether a CA generation needs its next CRL: none yet, or half its newest CRL's
    validity has passed (so a relying party always holds a CRL well before nextUpdate)."""
    if this_update is None or next_update is None:
        return True
    return now >= this_update + (next_update - this_update) / 2


# --- which CA certificates to trust -------------------------------------------------------------
@dataclass(frozen=True)
class CaRecord:
    """A CA certificate as the inventory holds it: name, generation and DER."""

    name: str
    generation: int
    der: bytes


def check_cas(records: Sequence[CaRecord],
              audited: Mapping[tuple[str, int], Certified]) -> dict[tuple[str, int],
                                                                      x509.Certificate]:
    """Check each CA certificate against the root and the trail; return them parsed.

    The root must be self-signed and the one its ceremony audited: the SHA-256 of its
    SubjectPublicKeyInfo when the trail has it, else (a certification audited before the
    digest was) its serial number. Every other CA certificate must be signed by that root and
    carry the serial its ceremony audited.

    Raises:
        PkiError: naming the CA and generation that fails.
    """
    by_name = {(r.name, r.generation): r for r in records}
    root_at = (profiles.ROOT, 1)
    if root_at not in by_name:
        raise PkiError("CA root generation 1", "no root certificate in the inventory: run "
                                               "meterkeys pki ceremony")
    root = _check_one(by_name[root_at], audited, None)
    return {at: root if at == root_at else _check_one(r, audited, root)
            for at, r in by_name.items()}


def _check_one(record: CaRecord, audited: Mapping[tuple[str, int], Certified],
               root: x509.Certificate | None) -> x509.Certificate:
    what = f"CA {record.name} generation {record.generation}"
    try:
        cert = x509.load_der_x509_certificate(record.der)
        cert.verify_directly_issued_by(root or cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        issuer = "the stored root" if root else "itself"
        raise PkiError(what, f"its certificate is not signed by {issuer} "
                             f"({type(exc).__name__}): refusing to use or publish it") from None
    made = audited.get((record.name, record.generation))
    if made is None:
        raise PkiError(what, "the audit trail records no ceremony that certified it")
    if root is None and made.spki_sha256 is not None:
        if spki_digest(cert) != made.spki_sha256:
            raise PkiError(what, "its key is not the one the ceremony audited: a planted root")
    elif profiles.serial_b64(cert.serial_number) != made.serial:
        raise PkiError(what, "its serial is not the one the ceremony audited")
    return cert


__all__ = ["CA_REASONS", "CERTIFY", "CA_REVOKE", "CRL_ISSUE", "REVOKE", "TRAIL_ACTIONS",
           "CaRecord", "CaState", "Certified", "Event", "ceremony_plan", "certified",
           "check_cas", "crl_due", "crl_entries", "last_audited_crl", "next_crl_number",
           "parse_ca_revocations", "revocations", "revoked_cas", "spki_digest"]
