"""Decisions of the PKI, pure: what a ceremony makes, the next CRL number.

A ceremony makes every CA that does not exist yet (generation 1) and renews an online sub-CA
(generation n + 1: a new key and a new certificate; the old one is retired but stays valid
until it expires, and keeps signing its CRL) when asked to, or once its issuing period is over
(``policy.CA_ISSUING_PERIOD``, NIST SP 800-57 Part 1 §5.3.6). The root is never renewed here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from lifecycle import policy
from lifecycle.errors import PkiError
from lifecycle.pki import profiles


@dataclass(frozen=True)
class CaState:
    """A CA's newest active generation as the inventory holds it."""

    name: str
    generation: int
    not_before: datetime


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
        elif name in renew or (name != profiles.ROOT
                               and now >= state.not_before + policy.CA_ISSUING_PERIOD):
            plan[name] = state.generation + 1
    return plan


def next_crl_number(last: int | None) -> int:
    """Return the number of the next CRL of a CA generation (RFC 5280 §5.2.3: increasing)."""
    return 1 if last is None else last + 1


__all__ = ["CaState", "ceremony_plan", "next_crl_number"]
