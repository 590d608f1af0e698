"""The claim's decisions, pure: which meters are claimed, which keys are made, what an answer
proves, and how each key version moves.

How a claim settles the master key (the lead's "master may lag" question, answered by proof).
A meter applies a key transfer in array order and may stop after any key (power loss); a GCM
proof (``lifecycle.dlms.proof``) shows only the GUEK a meter holds, so in one transfer
GBEK, GAK, GUEK, KEK a proof under the new GUEK cannot tell whether the master came over too,
and a meter's "ok" or "not ok" is a claim, not evidence. The claim therefore sends two orders
per attempt (``TRANSFER_KEYS``):

1. ``master``: GBEK, GAK and then the master key, wrapped under the meter's current (factory)
   master key; the master comes last, so after any prefix the meter holds only keys the
   inventory holds (factory or pending versions);
2. ``guek``: the new GUEK alone, wrapped under the *new* master key. A meter can unwrap it only
   once its master is the new one, which it installs only after GBEK and GAK.

A proof under the new GUEK therefore proves all four keys (RFC 3394's integrity check makes a
wrong master fail the unwrap; the GCM ciphertext check in the HSM proves the GUEK). No status
is taken on trust and no third key version is ever needed: a retry re-sends the same two
key_data with fresh challenges, and a meter whose master is already new refuses the first
order harmlessly and takes the second.

Recovery asks the meter to prove possession with a fresh challenge (``Hes.prove``) and tries
the pending GUEK, then the active one: under the pending GUEK the claim is proven; under the
active one the meter is on its factory GUEK (its GBEK, GAK or master may be new: every one of
them is a stored version, and the next run re-sends both orders); neither, and it waits.

An answer changes key state only through a proof checked in the HSM; an answer for an unknown
order, an order already settled, or a proof whose invocation counter is not above the last one
seen for that key version (Green Book §9.2.7.2.4.1) changes nothing and is audited.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from lifecycle.dlms.counter import check_counter
from lifecycle.errors import ClaimError, CounterReplayed
from lifecycle.policy import KeyId

FACTORY_VERSION = 1


class OrderKind(StrEnum):
    MASTER = "master"  # GBEK, GAK, master key under the current (factory) master key
    GUEK = "guek"  # the new GUEK under the new master key; its proof confirms the claim


# What each order of an attempt carries, in key_data order (the master key last in the first).
TRANSFER_KEYS: dict[OrderKind, tuple[KeyId, ...]] = {
    OrderKind.MASTER: (KeyId.GBEK, KeyId.GAK, KeyId.KEK),
    OrderKind.GUEK: (KeyId.GUEK,),
}


class OrderStatus(StrEnum):
    PENDING = "pending"  # sent, no outcome yet
    ANSWERED = "answered"  # an outcome came back; the claim decided on its evidence
    SUPERSEDED = "superseded"  # a later attempt replaced it before it was answered


class Evidence(StrEnum):
    """Which GUEK version, if any, a meter's answer was proven under."""

    PENDING = "pending"
    ACTIVE = "active"
    NONE = "none"


class Verdict(StrEnum):
    CONFIRM = "confirm"  # proven under the new GUEK: every pending version becomes active
    FACTORY = "factory"  # proven under the factory GUEK: the meter did not take the keys
    UNPROVEN = "unproven"  # no proof holds: ask the meter (recovery), else wait
    DELIVERED = "delivered"  # the first order's outcome: recorded, proves nothing by itself
    IGNORED = "ignored"  # unknown order, or an order already settled: nothing changes
    REPLAYED = "replayed"  # a counter at or below the last one seen: nothing changes


@dataclass(frozen=True)
class KeyView:
    """One key version of a meter as the rules see it."""

    key_id: int
    version: int
    state: str


@dataclass(frozen=True)
class MeterView:
    """A meter as the rules see it: its state and its key versions."""

    serial: str
    state: str
    suite: int
    keys: tuple[KeyView, ...]

    def of_key(self, key_id: KeyId, state: str) -> list[KeyView]:
        """Return the versions of one key in one state."""
        return list(self._by_key_state.get((int(key_id), state), ()))

    @functools.cached_property
    def _by_key_state(self) -> dict[tuple[int, str], list[KeyView]]:
        grouped: dict[tuple[int, str], list[KeyView]] = {}
        for key in self.keys:
            grouped.setdefault((int(key.key_id), key.state), []).append(key)
        return grouped


@dataclass(frozen=True)
class KeyPlan:
    """What a claim attempt sends: new versions to make (none when they exist), the version of
    each pending key, and the active master version the first order is wrapped under."""

    make: bool
    new_version: int
    master_version: int


CLAIMABLE = ("registered", "claimed")
_KEYS = tuple(KeyId)  # iterating the enum itself costs more, per meter
_KEY_IDS = frozenset(int(k) for k in KeyId)


def refusal(meter: MeterView) -> str | None:
    """Return why a meter cannot be claimed now, or None when it can."""
    if meter.state not in CLAIMABLE:
        return f"meter is {meter.state}, not registered or in claim"
    return None


def plan_keys(meter: MeterView) -> KeyPlan:
    """Decide the keys of a claim attempt.

    Each key must have exactly one active version. With no pending version, one pending
    version of each key is to be made (the next version number, the same for the four keys);
    with four pending versions of one number, they are re-sent as they are (never new keys
    while pending ones exist).

    Raises:
        ClaimError: a key has no or several active versions, or the pending versions are not
            one of each key with one version number (a torn or tampered inventory).
    """
    # One pass over the versions (this runs for every meter of a chunk, several times).
    active: dict[int, int] = {}
    waiting: dict[int, list[int]] = {}
    top = 0
    for k in meter.keys:
        if k.key_id not in _KEY_IDS:
            continue
        top = max(top, k.version)
        if k.state == "active":
            active[k.key_id] = active.get(k.key_id, 0) + 1
        elif k.state == "pending":
            waiting.setdefault(k.key_id, []).append(k.version)
    for key in _KEYS:
        if active.get(key, 0) != 1:
            raise ClaimError(f"meter {meter.serial}", f"{key.name} has {active.get(key, 0)} "
                                                      "active versions, not one")
        if len(waiting.get(key, ())) > 1:
            raise ClaimError(f"meter {meter.serial}", f"{key.name} has {len(waiting[key])} "
                                                      "pending versions")
    master = meter.of_key(KeyId.KEK, "active")[0].version
    if not waiting:
        return KeyPlan(True, top + 1, master)
    pending = {v for versions in waiting.values() for v in versions}
    if len(waiting) != len(KeyId) or len(pending) != 1:
        raise ClaimError(f"meter {meter.serial}", "pending versions are not one of each key "
                                                  "with one version number")
    return KeyPlan(False, pending.pop(), master)


def judge(kind: str | None, status: str | None, evidence: Evidence,
          last_counter: int | None, counter: int | None, *, in_claim: bool = True) -> Verdict:
    """Decide what one outcome means.

    ``kind`` and ``status`` are the order's (None: no such order); ``evidence`` which GUEK the
    proof holds under; ``counter`` the proof's invocation counter and ``last_counter`` the last
    one seen for that key version; ``in_claim`` whether the meter is still in claim. An outcome
    for a meter whose claim is settled (operational, or back to registered) changes nothing,
    whatever its order's status says: the status is a database record, which a writer could
    set back to pending to have an old answer judged again.
    """
    if kind is None or status != OrderStatus.PENDING or not in_claim:
        return Verdict.IGNORED
    if evidence != Evidence.NONE:
        try:
            check_counter(last_counter, counter if counter is not None else -1)
        except CounterReplayed:
            return Verdict.REPLAYED
    if evidence == Evidence.PENDING:
        return Verdict.CONFIRM  # under the new GUEK, whichever order it answers
    if kind == OrderKind.MASTER:
        return Verdict.DELIVERED  # the GUEK does not change with the first order
    return Verdict.FACTORY if evidence == Evidence.ACTIVE else Verdict.UNPROVEN


def recovered(evidence: Evidence) -> Verdict:
    """Decide what a recovery proof (``Hes.prove``, fresh challenge) means."""
    return {Evidence.PENDING: Verdict.CONFIRM, Evidence.ACTIVE: Verdict.FACTORY,
            Evidence.NONE: Verdict.UNPROVEN}[evidence]


@dataclass(frozen=True)
class Transition:
    """One key version's move: from state, to state."""

    key_id: int
    version: int
    to: str


def confirm(meter: MeterView) -> list[Transition]:
    """Return the moves of a proven claim, in the order they happen.

    The pending versions become active; each factory (active) version is retired, then
    destroyed (its blob removed): once the meter proved the new keys, nobody, the manufacturer
    included, has a use for the old ones (NIST SP 800-57 Part 1 §8.3.4: destroy keys no longer
    needed).

    Raises:
        ClaimError: the meter has not one pending version of each key (see ``plan_keys``).
    """
    plan = plan_keys(meter)  # one active version of each key, one pending of each
    if plan.make:
        raise ClaimError(f"meter {meter.serial}", "nothing pending to confirm")
    old = {k.key_id: k.version for k in meter.keys if k.state == "active"}
    moves: list[Transition] = []
    for key in _KEYS:
        moves += [Transition(int(key), plan.new_version, "active"),
                  Transition(int(key), old[key], "retired"),
                  Transition(int(key), old[key], "destroyed")]
    return moves


def last_moves(moves: Sequence[Transition]) -> dict[tuple[int, int], str]:
    """Return (key id, version) -> state after the moves, for the versions they move only."""
    return {(move.key_id, move.version): move.to for move in moves}


def overdue(created_at: datetime, now: datetime, wait_seconds: float) -> bool:
    """Whether an order sent at ``created_at`` has waited its time out at ``now``."""
    return (now - created_at).total_seconds() >= wait_seconds
