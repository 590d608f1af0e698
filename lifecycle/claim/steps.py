"""Ownership claim steps: the DSO's keys onto registered meters, proven, the factory keys gone.

Steps (``lifecycle.claim.rules`` draws the protocol and why it proves the master key):
1. ``select_meters``: the meters of a batch, a vendor or a list of serials, registered or in
   claim.
2. ``prepare_chunk``: a suite 1/2 meter's factory certificate must verify against its vendor's
   registered factory CAs (``lifecycle.pki.trust``), else the meter is not claimed (reason
   reported and audited); per meter, four pending key versions made in the HSM (worker jobs,
   ``lifecycle.meter_keys.transfer.run_transfer``: GBEK, GAK and the master under the factory
   master; then the GUEK under the new master) or, when pending versions exist, their stored
   key_data again; pending versions, the attempt's two orders (fresh challenges), the meter's
   state and the audit events commit in one transaction. A meter whose claim cannot start is
   reported and audited, the others go on.
3. ``submit``: the orders go to the HES.
4. ``settle``: each outcome's proof is checked in the HSM against the pending GUEK, then the
   active one (``run_proof_checks``); the pure ``judge`` decides; a proven claim activates the
   new versions, retires and destroys the factory ones, makes the meter operational and ends the
   manufacturer's access, in one transaction with its audit events.
5. ``recover``: meters whose outcome proved nothing are asked to prove possession with a fresh
   challenge (``Hes.prove``) and settled the same way.
6. operational certificates for the claimed suite 1/2 meters: ``lifecycle.claim.certification``.

Kill the run anywhere and run it again: a meter's pending versions and its orders commit
together; a re-run re-sends the same key_data (never new keys while pending ones exist), and an
outcome of an order already settled or superseded changes nothing. The audit trail carries ids,
versions and counts, never a key, a wrapped key or a challenge.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.claim import rules
from lifecycle.claim.rules import Evidence, MeterView, OrderKind, OrderStatus, Verdict
from lifecycle.config import Settings
from lifecycle.dlms.proof import new_challenge
from lifecycle.errors import ClaimError, PortError
from lifecycle.hes.port import Hes, KeyOrder, Outcome, new_order_id
from lifecycle.hsm import keyring
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.inventory import audit_events, claims
from lifecycle.inventory.db import Engine, refresh_statistics, transaction
from lifecycle.inventory.meters import KeyState, MeterState
from lifecycle.meter_keys.transfer import (
    MeterTransfer,
    ProofCheck,
    ProofJob,
    ProofVerdict,
    Refused,
    Transfer,
    TransferJob,
    run_proof_checks,
    run_transfer,
)
from lifecycle.pki import steps as pki_steps
from lifecycle.pki import trust
from lifecycle.policy import CRYPTOPERIODS, SUITES, KeyId

ORIGIN = "claim"
POLL_SECONDS = 0.2
# Meters a worker job at most. The workers serve an earlier chunk's jobs first, but do not stop
# one under way: a job the flow waits for starts within one such part of the work made ahead.
PART = 1000
_WRITE_LOCK = threading.Lock()  # writers of one process take turns (see factory_import.steps)


@dataclass(frozen=True)
class Selection:
    """Which meters a claim is for: a batch, a vendor, or serials (any one of them)."""

    batch_id: int | None = None
    vendor: str | None = None
    serials: tuple[str, ...] = ()

    def check(self) -> None:
        """Raises:
            ClaimError: none or more than one of batch, vendor and serials is given.
        """
        given = sum((self.batch_id is not None, self.vendor is not None, bool(self.serials)))
        if given != 1:
            raise ClaimError("selection", "give exactly one of a batch id, a vendor or serials")


@dataclass
class Report:
    """What became of a run's meters, by serial (no key material)."""

    claimed: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)
    certified: list[str] = field(default_factory=list)  # operational certificates delivered
    uncertified: dict[str, str] = field(default_factory=dict)  # claimed, certificates refused

    def merge(self, other: Report) -> None:
        """Add another part's outcome; a later word on a meter replaces an earlier one."""
        for serial in [*other.claimed, *other.recovered]:
            self.failed.pop(serial, None)
            self.waiting.pop(serial, None)
        for serial in other.certified:
            self.uncertified.pop(serial, None)
        self.claimed += other.claimed
        self.recovered += other.recovered
        self.failed.update(other.failed)
        self.waiting.update(other.waiting)
        self.certified += other.certified
        self.uncertified.update(other.uncertified)

    def summary(self) -> dict[str, Any]:
        """Counts and lists, JSON-ready."""
        return {"claimed": sorted(self.claimed), "recovered": sorted(self.recovered),
                "failed": dict(sorted(self.failed.items())),
                "waiting": dict(sorted(self.waiting.items())),
                "certified": sorted(self.certified),
                "uncertified": dict(sorted(self.uncertified.items()))}


# --- 1. selection ----------------------------------------------------------------------------
def select_meters(engine: Engine, selection: Selection) -> list[int]:
    """Return the ids of the selected meters that are registered or in claim, by serial.

    Raises:
        ClaimError: the selection names none or several kinds.
    """
    selection.check()
    with transaction(engine) as session:
        return claims.select_meter_ids(session, batch_id=selection.batch_id,
                                       vendor=selection.vendor, serials=selection.serials,
                                       states=rules.CLAIMABLE)


def chunked(ids: Sequence[int], size: int) -> list[list[int]]:
    """Split meter ids into chunks of ``size``."""
    return [list(ids[i:i + size]) for i in range(0, len(ids), size)]


# --- 2. prepare ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Meter:
    meter: claims.MeterRow
    keys: list[claims.KeyRow]

    @functools.cached_property
    def view(self) -> MeterView:
        return MeterView(self.meter.serial, self.meter.state, self.meter.suite,
                         tuple(rules.KeyView(k.key_id, k.version, k.state) for k in self.keys))

    def key(self, key_id: KeyId, state: str) -> claims.KeyRow:
        return self.by_state[(key_id, state)]

    @functools.cached_property
    def by_state(self) -> dict[tuple[int, str], claims.KeyRow]:
        """(key id, state) -> the first version of that key in that state."""
        found: dict[tuple[int, str], claims.KeyRow] = {}
        for k in self.keys:
            found.setdefault((k.key_id, k.state), k)
        return found


def _load(engine: Engine, meter_ids: Sequence[int], blobs_of: KeyId,
          state: str | None = None) -> list[_Meter]:
    # Only ``blobs_of``'s blobs are read: a step uses one key's (the master's to make the new
    # keys, the GUEK's to check proofs); the others stay in the database.
    with transaction(engine) as session:
        found = [m for m in claims.meter_rows(session, meter_ids)
                 if state is None or m.state == state]
        keys = claims.key_rows_of(session, [int(m.id or 0) for m in found], blobs_of=blobs_of)
    return [_Meter(m, keys[int(m.id or 0)]) for m in found]


def prepare_chunk(workers: HsmWorkers, engine: Engine, settings: Settings, actor: Actor,
                  meter_ids: Sequence[int], now: datetime) -> tuple[list[KeyOrder], Report]:
    """Make (or find) each meter's pending keys and commit the attempt's orders; return the
    orders to submit and the meters that could not start.

    Raises:
        HsmError: the HSM failed as a whole (transient errors may be retried).
    """
    report = Report()
    meters = []
    events: list[dict[str, Any]] = []
    items = _load(engine, meter_ids, KeyId.KEK)
    refusals = [rules.refusal(m.view) for m in items]
    untrusted = _untrusted(workers, engine, settings,
                           [m for m, r in zip(items, refusals, strict=True) if r is None], now)
    for item, reason in zip(items, refusals, strict=True):
        if reason is None and (reason := untrusted.get(item.meter.serial)) is not None:
            events.append(_event("claim.prepare", "refused", item.meter.serial,
                                 {"reason": reason[:200]}))
        try:
            plan = rules.plan_keys(item.view) if reason is None else None
        except ClaimError as exc:
            reason = exc.reason
        if plan is None:
            report.failed[item.meter.serial] = reason or "not claimable"
            continue
        meters.append((item, plan))
    fresh = [(m, p) for m, p in meters if p.make]
    made = _make_keys(workers, settings, fresh) if fresh else {}
    orders = _commit_attempt(engine, settings, actor, meters, made, report, events, now)
    refresh_statistics(engine)
    return orders, report


def _untrusted(workers: HsmWorkers, engine: Engine, settings: Settings,
               items: Sequence[_Meter], now: datetime) -> dict[str, str]:
    """Why each suite 1/2 meter's factory credentials do not verify, by serial (those that
    verify, and suite 0 meters, are absent).

    The factory certificate must chain to one of the vendor's registered factory CAs that their
    signed registration and the audit trail attest (``lifecycle.pki.trust``; a row planted by
    SQL is refused: ``pki.steps.factory_anchors``). A meter whose manufacturer cannot be
    trusted for it is not taken over: the DSO would certify a key it cannot tie to the meter
    it bought. The checks run in the HSM workers (software only), a part each.
    """
    checks = [trust.FactoryCheck(m.meter.serial, m.meter.system_title, m.meter.suite,
                                 m.meter.vendor_id, m.meter.factory_certificate)
              for m in items if SUITES[m.meter.suite].needs_certificate]
    if not checks:
        return {}
    anchors = pki_steps.factory_anchors(engine, settings, sorted({c.vendor_id for c in checks}))
    reasons = _spread(workers, lambda part: workers.submit(
        trust.check_factory_job, trust.FactoryCheckJob(tuple(part), anchors, now)), checks)
    return {c.serial: r for c, r in zip(checks, reasons, strict=True) if r is not None}


@dataclass(frozen=True)
class _Made:
    """A meter's new pending keys (sealed) and the key_data of each order of its attempt."""

    keys: tuple[Any, ...]
    key_data: dict[OrderKind, bytes]


def _make_keys(workers: HsmWorkers, settings: Settings,
               fresh: Sequence[tuple[_Meter, rules.KeyPlan]]) -> dict[str, _Made | Refused]:
    # Two HSM jobs: the first makes GBEK, GAK and the master under the factory master; the
    # second makes the GUEK under the new master, whose blob (and MAC) the first returned.
    pins = keyring.trusted_pins()
    first = [MeterTransfer(m.meter.serial, m.meter.system_title, m.meter.suite,
                           bytes(master.blob), bytes(master.mac or b""), master.version,
                           plan.new_version, rules.TRANSFER_KEYS[OrderKind.MASTER])
             for m, plan in fresh
             for master in [m.key(KeyId.KEK, KeyState.ACTIVE)]]
    masters = _spread(workers, lambda part: workers.submit(run_transfer,
                                                          TransferJob(part, pins)), first)
    second = []
    for meter, made in zip(first, masters, strict=True):
        if isinstance(made, Transfer):
            kek = next(k for k in made.keys if k.key_id == KeyId.KEK)
            second.append(MeterTransfer(meter.serial, meter.system_title, meter.suite, kek.blob,
                                        kek.mac, kek.version, meter.new_version,
                                        rules.TRANSFER_KEYS[OrderKind.GUEK]))
    gueks = _spread(workers, lambda part: workers.submit(run_transfer,
                                                        TransferJob(part, pins)), second)
    out: dict[str, _Made | Refused] = {m.serial: m for m in masters if isinstance(m, Refused)}
    first_of = {m.serial: m for m in masters if isinstance(m, Transfer)}
    for made in gueks:
        if isinstance(made, Refused):
            out[made.serial] = made
            continue
        head = first_of[made.serial]
        out[made.serial] = _Made(head.keys + made.keys, {OrderKind.MASTER: head.key_data,
                                                         OrderKind.GUEK: made.key_data})
    return out


def _spread(workers: HsmWorkers, submit: Callable[[list[Any]], Future[list[Any]]],
            items: Sequence[Any]) -> list[Any]:
    """Run a batch job over the workers in parts of at most ``PART`` items, at least one a
    worker (submitted together so they work in parallel); return the parts' results in the
    items' order."""
    if not items:
        return []
    size = min(PART, -(-len(items) // max(1, workers.workers)))
    futures = [submit(list(items[i:i + size])) for i in range(0, len(items), size)]
    return [result for future in futures for result in workers.result(future)]


def _commit_attempt(engine: Engine, settings: Settings, actor: Actor,
                    meters: Sequence[tuple[_Meter, rules.KeyPlan]],
                    made: dict[str, _Made | Refused], report: Report,
                    events: list[dict[str, Any]], now: datetime) -> list[KeyOrder]:
    orders: list[KeyOrder] = []
    with _WRITE_LOCK, transaction(engine) as session:
        current = {m.meter.serial: m for m in _reload(session, [m for m, _ in meters])}
        latest = claims.last_orders(session, [int(m.meter.id or 0) for m in current.values()])
        key_rows: list[dict[str, Any]] = []
        order_rows: list[dict[str, Any]] = []
        for item, _plan in meters:
            serial = item.meter.serial
            fresh = current.get(serial)
            try:
                if fresh is None:
                    raise ClaimError(f"meter {serial}", "no longer in the inventory")
                plan = rules.plan_keys(fresh.view)
                key_data = _attempt_key_data(session, fresh, plan, made.get(serial), key_rows,
                                             now)
            except ClaimError as exc:
                report.failed[serial] = exc.reason
                events.append(_event("claim.prepare", "failed", serial, {"reason": exc.reason}))
                continue
            attempt = 1 + max((o.attempt for o in latest.get(int(fresh.meter.id or 0), [])),
                              default=0)
            for kind in _ORDER_KINDS:
                order = KeyOrder(new_order_id("CO"), serial, fresh.meter.system_title,
                                 fresh.meter.suite, key_data[kind], new_challenge(), now)
                orders.append(order)
                order_rows.append({"order_id": order.order_id, "meter_id": fresh.meter.id,
                                   "attempt": attempt, "kind": str(kind),
                                   "key_data": order.key_data, "challenge": order.challenge,
                                   "status": OrderStatus.PENDING, "created_at": now})
            events.append(_event("claim.prepare", "ok", serial, {
                "attempt": attempt, "version": plan.new_version, "generated": plan.make,
                "orders": [r["order_id"] for r in order_rows[-2:]],
                "key_ids": list(_KEY_IDS)}))
        ids = [int(current[o.meter_serial].meter.id or 0) for o in orders[::2]]
        claims.supersede(session, ids, now)
        claims.insert_key_versions(session, key_rows)
        claims.add_orders(session, order_rows)
        claims.set_meter_state(session, ids, MeterState.CLAIMED, now)
        trail.record_many(session, actor, events, at=now)
        _maybe_checkpoint(session, settings, now)
    return orders


_ORDER_KINDS = tuple(OrderKind)  # iterating an enum costs more than a tuple, per meter
_KEY_IDS = tuple(int(k) for k in KeyId)


def _reload(session: Any, items: Sequence[_Meter]) -> list[_Meter]:
    # States only: what the transaction decides on; the blobs were read (and checked) before.
    ids = [int(m.meter.id or 0) for m in items]
    keys = claims.key_rows_of(session, ids, blobs_of=None)
    return [_Meter(m, keys[int(m.id or 0)]) for m in claims.meter_rows(session, ids)]


def _attempt_key_data(session: Any, item: _Meter, plan: rules.KeyPlan,
                      made: _Made | Refused | None, key_rows: list[dict[str, Any]],
                      now: datetime) -> dict[OrderKind, bytes]:
    if not plan.make:
        last = claims.last_orders(session, [int(item.meter.id or 0)]).get(int(item.meter.id or 0))
        stored = {OrderKind(o.kind): bytes(o.key_data) for o in last or []}
        if set(stored) != set(OrderKind):
            raise ClaimError(f"meter {item.meter.serial}", "pending keys without their orders")
        return stored
    if made is None:
        raise ClaimError(f"meter {item.meter.serial}", "pending keys appeared meanwhile: the "
                                                       "next run re-sends them")
    if isinstance(made, Refused):
        raise ClaimError(f"meter {item.meter.serial}", made.reason)
    for key in made.keys:
        key_rows.append({"meter_id": item.meter.id, "key_id": int(key.key_id),
                         "version": key.version, "state": KeyState.PENDING, "blob": key.blob,
                         "mac": key.mac, "kek_label": key.kek_label, "origin": ORIGIN,
                         "created_at": now, "activated_at": None, "expires_at": None})
    return made.key_data


def _event(action: str, outcome: str, serial: str, detail: dict[str, Any],
           key_version_id: int | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"action": action, "outcome": outcome, "meter_serial": serial,
                             "detail": detail}
    if key_version_id is not None:
        event["key_version_id"] = key_version_id
    return event


def _maybe_checkpoint(session: Any, settings: Settings, now: datetime) -> None:
    with Hsm.open(settings).session() as hsm:
        trail.maybe_checkpoint(session, hsm, settings, at=now)


# --- 3. submit -------------------------------------------------------------------------------
def submit(hes: Hes, engine: Engine, actor: Actor, orders: Sequence[KeyOrder],
           now: datetime) -> None:
    """Hand orders to the HES and audit that they went (order ids only)."""
    if not orders:
        return
    hes.submit(orders)
    with transaction(engine) as session:
        trail.record(session, actor, "claim.submit", "ok",
                     detail={"orders": len(orders), "meters": len({o.meter_serial
                                                                   for o in orders})}, at=now)


def collect(hes: Hes, expected: set[str], wait_seconds: float,
            clock: Callable[[], float] = time.monotonic) -> list[Outcome]:
    """Gather outcomes until every expected order has one or ``wait_seconds`` pass."""
    deadline = clock() + wait_seconds
    found: list[Outcome] = []
    while True:
        found += hes.outcomes()
        if expected <= {o.order_id for o in found} or clock() >= deadline:
            return found
        time.sleep(POLL_SECONDS)


# --- 4. settle -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Judged:
    serial: str
    verdict: Verdict
    evidence: Evidence
    counter: int | None
    reason: str
    order_id: str | None = None
    hes_status: str | None = None


def settle(workers: HsmWorkers, engine: Engine, settings: Settings, actor: Actor,
           outcomes: Sequence[Outcome], now: datetime) -> Report:
    """Check each outcome's proof in the HSM, judge it, and commit what it proves.

    Raises:
        HsmError: the HSM failed as a whole.
    """
    with transaction(engine) as session:
        orders = claims.orders_by_id(session, [o.order_id for o in outcomes])
    meter_ids = sorted({o.meter_id for o in orders.values()})
    by_id = {int(m.meter.id or 0): m for m in _load(engine, meter_ids, KeyId.GUEK)}
    checks: list[tuple[Outcome, _Meter]] = []
    for outcome in outcomes:
        order = orders.get(outcome.order_id)
        item = by_id.get(order.meter_id) if order else None
        if item is not None and outcome.proof_apdu is not None \
                and item.meter.serial == outcome.meter_serial:
            checks.append((outcome, item))
    evidence = _evidence(workers, settings, [(o.order_id, item, bytes(orders[o.order_id]
                                              .challenge), o.proof_apdu or b"")
                                             for o, item in checks],
                         {o.order_id: Evidence.ACTIVE for o, _ in checks
                          if orders[o.order_id].kind == OrderKind.MASTER})
    report = _commit_judged(engine, settings, actor, outcomes, orders, by_id, evidence, now)
    refresh_statistics(engine)
    return report


def _evidence(workers: HsmWorkers, settings: Settings,
              asks: Sequence[tuple[str, _Meter, bytes, bytes]],
              first: dict[str, Evidence] | None = None
              ) -> dict[str, tuple[Evidence, int | None, str]]:
    """Check answers against the GUEK each is expected under (``first``: the factory GUEK for a
    master order's answer; otherwise the pending one), then the failures against the other:
    ``key -> (evidence, counter, reason)``. A proof holds under one key at most, so the order
    decides only how many checks the HSM makes (one per answer when meters behave)."""
    expected = first or {}
    pins = keyring.trusted_pins()
    out: dict[str, tuple[Evidence, int | None, str]] = {}
    unbound: dict[str, str] = {}  # a blob refused by its MAC stays in the record, proof or not
    rounds = [lambda key: expected.get(key, Evidence.PENDING),
              lambda key: Evidence.ACTIVE if expected.get(key, Evidence.PENDING)
              == Evidence.PENDING else Evidence.PENDING]
    for pick in rounds:
        todo = [(key, item, challenge, answer, pick(key))
                for key, item, challenge, answer in asks
                if key not in out or out[key][0] == Evidence.NONE]
        checks: list[ProofCheck] = []
        index: list[tuple[str, Evidence]] = []
        for key, item, challenge, answer, evidence in todo:
            guek = _guek_of(item, evidence)
            if guek is None:
                continue
            checks.append(ProofCheck(item.meter.serial, item.meter.system_title,
                                     item.meter.suite, bytes(guek.blob), bytes(guek.mac or b""),
                                     guek.version, challenge, answer, None))
            index.append((key, evidence))
        verdicts: list[ProofVerdict] = _spread(workers, lambda part: workers.submit(
            run_proof_checks, ProofJob(part, pins)), checks)
        for (key, evidence), verdict in zip(index, verdicts, strict=True):
            if not verdict.bound:
                unbound[key] = verdict.reason
            if verdict.proven:
                out[key] = (evidence, verdict.invocation_counter, unbound.get(key, ""))
            elif key not in out:
                out[key] = (Evidence.NONE, None, verdict.reason)
    return out


@dataclass
class _Pass:
    """One transaction's view and its writes, applied in bulk at the end (one UPDATE per kind
    of change, not one per key version: a chunk is thousands of rows)."""

    orders: dict[str, Any]  # order id -> ClaimOrder (read only: not changed in the session)
    counters: dict[int, int]  # GUEK version id -> last counter, kept current in this pass
    answered: set[str] = field(default_factory=set)  # orders settled in this pass
    settled: list[dict[str, Any]] = field(default_factory=list)
    confirmed: dict[str, _Meter] = field(default_factory=dict)
    puts: dict[int, int] = field(default_factory=dict)

    def flush(self, session: Any, events: list[dict[str, Any]], now: datetime) -> None:
        claims.put_counters(session, self.puts, now)
        claims.settle_orders(session, self.settled, now)
        _confirm_many(session, list(self.confirmed.values()), events, now)


def _commit_judged(engine: Engine, settings: Settings, actor: Actor,
                   outcomes: Sequence[Outcome], orders: dict[str, Any],
                   by_id: dict[int, _Meter], evidence: dict[str, tuple[Evidence, int | None, str]],
                   now: datetime) -> Report:
    report = Report()
    gueks = [int(k.id or 0) for m in by_id.values() for k in m.keys if k.key_id == KeyId.GUEK]
    with _WRITE_LOCK, transaction(engine) as session:
        work = _Pass(claims.orders_by_id(session, [o.order_id for o in outcomes],
                                         challenge=False),
                     claims.last_counters(session, gueks))
        events: list[dict[str, Any]] = []
        for outcome in outcomes:
            fresh = work.orders.get(outcome.order_id)
            item = by_id.get(fresh.meter_id) if fresh else None
            if item is not None and item.meter.serial != outcome.meter_serial:
                item = None
            found = evidence.get(outcome.order_id, (Evidence.NONE, None, "no proof"))
            judged = _judge(work, fresh if item else None, item, outcome, found)
            _apply(work, judged, item, report, events, now)
        work.flush(session, events, now)
        trail.record_many(session, actor, events, at=now)
        _maybe_checkpoint(session, settings, now)
    return report


def _judge(work: _Pass, order: Any, item: _Meter | None, outcome: Outcome,
           found: tuple[Evidence, int | None, str]) -> _Judged:
    evidence, counter, reason = found
    serial = outcome.meter_serial
    if order is None or item is None:
        return _Judged(serial, Verdict.IGNORED, evidence, counter, "unknown order",
                       outcome.order_id, outcome.status)
    last = _last_counter(work.counters, item, evidence)
    status = OrderStatus.ANSWERED if order.order_id in work.answered else order.status
    in_claim = item.meter.state == MeterState.CLAIMED
    verdict = rules.judge(order.kind, status, evidence, last, counter, in_claim=in_claim)
    if verdict == Verdict.IGNORED:
        reason = f"order already {status}" if in_claim else \
            f"meter is {item.meter.state}: its claim is settled"
    elif verdict == Verdict.REPLAYED:
        reason = f"invocation counter {counter} is not above {last}"
    return _Judged(serial, verdict, evidence, counter, reason, outcome.order_id, outcome.status)


def _last_counter(counters: dict[int, int], item: _Meter, evidence: Evidence) -> int | None:
    guek = _guek_of(item, evidence)
    return None if guek is None else counters.get(int(guek.id or 0))


def _guek_of(item: _Meter, evidence: Evidence) -> claims.KeyRow | None:
    state = _GUEK_STATE.get(evidence)
    return None if state is None else item.by_state.get((KeyId.GUEK, state))


_GUEK_STATE = {Evidence.PENDING: KeyState.PENDING, Evidence.ACTIVE: KeyState.ACTIVE}


_OUTCOME = {Verdict.CONFIRM: "ok", Verdict.FACTORY: "refused", Verdict.UNPROVEN: "unproven",
            Verdict.DELIVERED: "ok", Verdict.IGNORED: "ignored", Verdict.REPLAYED: "replayed"}


def _apply(work: _Pass, judged: _Judged, item: _Meter | None, report: Report,
           events: list[dict[str, Any]], now: datetime) -> None:
    counted = None if judged.verdict in (Verdict.IGNORED, Verdict.REPLAYED) or item is None \
        else _counted(item, judged)
    detail = {"order": judged.order_id, "hes_status": judged.hes_status,
              "verdict": str(judged.verdict), "evidence": str(judged.evidence),
              "counter": judged.counter, "guek_version_id": counted,
              "reason": judged.reason[:200]}
    events.append(_event("claim.outcome", _OUTCOME[judged.verdict], judged.serial, detail))
    if judged.verdict in (Verdict.IGNORED, Verdict.REPLAYED) or item is None:
        return
    _record_counter(work, item, judged)
    work.answered.add(judged.order_id or "")  # a second outcome of it here is ignored
    work.settled.append({"order_id": judged.order_id, "hes_status": judged.hes_status,
                         "verdict": str(judged.verdict),
                         "detail": json.dumps({"evidence": str(judged.evidence),
                                               "reason": judged.reason[:200]})})
    if judged.verdict == Verdict.CONFIRM:
        # The pass's confirmed meters and the report's claimed ones are the same (both added
        # here only): the dict answers "already counted" at once, the list would be searched.
        if item.meter.serial not in work.confirmed:
            work.confirmed[item.meter.serial] = item
            report.claimed.append(item.meter.serial)
    elif judged.verdict == Verdict.FACTORY:
        report.failed[item.meter.serial] = "the meter proves its factory GUEK: it did not " \
                                           "take the new keys" + \
                                           (f" ({judged.reason})" if judged.reason else "")
    elif judged.verdict == Verdict.UNPROVEN:
        report.waiting[item.meter.serial] = f"{judged.hes_status}, no proof: {judged.reason}"


def _counted(item: _Meter, judged: _Judged) -> int | None:
    """The GUEK version whose invocation counter this answer sets (None: it sets none)."""
    guek = _guek_of(item, judged.evidence)
    return None if guek is None or judged.counter is None else int(guek.id or 0)


def _record_counter(work: _Pass, item: _Meter, judged: _Judged) -> None:
    kv = _counted(item, judged)
    if kv is not None and judged.counter is not None:
        work.counters[kv] = work.puts[kv] = judged.counter


COUNTER_EVENTS = ("claim.outcome", "claim.recover")


def verify_counters(engine: Engine) -> list[str]:
    """Compare each GUEK version's stored invocation counter with the highest one the audit
    trail recorded as accepted for it; return one problem line per counter set back or
    deleted (a database writer re-opening replays). For ``audit verify``."""
    with transaction(engine) as session:
        highest: dict[int, int] = {}
        for _, text in audit_events.details_of(session, COUNTER_EVENTS, any_outcome=True):
            detail = json.loads(text)
            kv, ic = detail.get("guek_version_id"), detail.get("counter")
            if isinstance(kv, int) and isinstance(ic, int):
                highest[kv] = max(ic, highest.get(kv, ic))
        stored = claims.last_counters(session, list(highest))
    return [f"key version {kv}: invocation counter {stored.get(kv, 'missing')} is below "
            f"{ic}, which the audit trail accepted (set back?)"
            for kv, ic in sorted(highest.items()) if stored.get(kv, -1) < ic]


def _confirm_many(session: Any, items: Sequence[_Meter], events: list[dict[str, Any]],
                  now: datetime) -> None:
    """Activate the pending versions, retire and destroy the factory ones, and make the meters
    operational, in bulk (meters confirmed meanwhile, or moved on, are left as they are)."""
    changes: list[tuple[int, str, datetime | None]] = []
    done: list[int] = []
    expires = {int(k): now + CRYPTOPERIODS[k] for k in KeyId}
    for fresh in _reload(session, items):
        if fresh.meter.state != MeterState.CLAIMED:
            continue  # confirmed by an earlier outcome, or moved on meanwhile
        moves = rules.confirm(fresh.view)
        ids = {(k.key_id, k.version): int(k.id or 0) for k in fresh.keys}
        moved: dict[str, list[int]] = {verb: [] for verb in _VERBS.values()}
        for move in moves:
            moved[_VERBS[move.to]].append(ids[(move.key_id, move.version)])
        # Each moved version written once, in its final state (retired then destroyed: destroyed).
        changes += [(ids[version], to, expires[version[0]] if to == KeyState.ACTIVE else None)
                    for version, to in rules.last_moves(moves).items()]
        # One event per meter naming the key versions of each move (ids by verb, in the order
        # the moves happen): the facts of the per-version events it replaced, in one detail.
        events.append(_event("meter.claim", "ok", fresh.meter.serial,
                             {"version": moves[0].version, "manufacturer_access": "ended",
                              "moved_key_version_ids": moved}))
        done.append(int(fresh.meter.id or 0))
    claims.set_key_states(session, changes, now)
    claims.supersede(session, done, now)
    claims.set_meter_state(session, done, MeterState.OPERATIONAL, now, access_ended=True)


_VERBS: dict[str, str] = {KeyState.ACTIVE: "activate", KeyState.RETIRED: "retire",
                          KeyState.DESTROYED: "destroy"}


# --- 5. recover ------------------------------------------------------------------------------
def recover(workers: HsmWorkers, hes: Hes, engine: Engine, settings: Settings, actor: Actor,
            meter_ids: Sequence[int], now: datetime) -> Report:
    """Ask each meter still in claim to prove the GUEK it holds (fresh challenge); try the
    pending GUEK, then the active one, and make the inventory match what the meter proves.

    Raises:
        HsmError: the HSM failed as a whole.
    """
    items = _load(engine, meter_ids, KeyId.GUEK, MeterState.CLAIMED)
    asks: list[tuple[str, _Meter, bytes, bytes]] = []
    report = Report()
    for item in items:
        challenge = new_challenge()
        answer = hes.prove(item.meter.serial, item.meter.system_title, challenge)
        if answer is None:
            report.waiting[item.meter.serial] = "the meter does not answer a challenge"
            continue
        asks.append((item.meter.serial, item, challenge, answer))
    if not asks:
        # Nothing to settle (the usual case: every meter of the chunk proved its claim): no
        # transaction, so the next chunk's commit does not hold this one up, and the chunk's
        # certificates start at once.
        return report
    found = _evidence(workers, settings, asks)
    with _WRITE_LOCK, transaction(engine) as session:
        events: list[dict[str, Any]] = []
        unanswered = _unanswered(session, [item for _, item, _, _ in asks])
        work = _Pass({}, claims.last_counters(session, [
            int(k.id or 0) for _, m, _, _ in asks for k in m.keys if k.key_id == KeyId.GUEK]))
        for serial, item, _challenge, _answer in asks:
            evidence, counter, reason = found.get(serial, (Evidence.NONE, None, "no proof"))
            last = _last_counter(work.counters, item, evidence)
            verdict = rules.recovered(evidence)
            if evidence != Evidence.NONE and last is not None and (counter or 0) <= last:
                verdict, reason = Verdict.REPLAYED, f"invocation counter {counter} is not " \
                                                    f"above {last}"
            judged = _Judged(serial, verdict, evidence, counter, reason)
            counted = None if verdict == Verdict.REPLAYED else _counted(item, judged)
            events.append(_event("claim.recover", _OUTCOME[verdict], serial,
                                 {"evidence": str(evidence), "counter": counter,
                                  "guek_version_id": counted, "reason": reason[:200]}))
            if verdict in (Verdict.REPLAYED,):
                report.waiting[serial] = reason
                continue
            _record_counter(work, item, judged)
            if verdict == Verdict.CONFIRM:
                work.confirmed.setdefault(serial, item)
                report.recovered.append(serial)
            elif verdict == Verdict.FACTORY and serial in unanswered:
                report.waiting[serial] = "no answer to its orders, the meter holds its " \
                                         "factory GUEK; the next run re-sends the pending keys"
            elif verdict == Verdict.FACTORY:
                report.failed[serial] = "the meter holds its factory GUEK; the next run " \
                                        "re-sends the pending keys"
            else:
                report.waiting[serial] = reason or "no proof holds"
        work.flush(session, events, now)
        trail.record_many(session, actor, events, at=now)
        _maybe_checkpoint(session, settings, now)
    return report


def _unanswered(session: Any, items: Sequence[_Meter]) -> set[str]:
    """The meters whose latest orders the HES reported no answer for (timeout, or none yet):
    a meter that then proves its factory GUEK never got the orders, it did not refuse them."""
    latest = claims.last_orders(session, [int(m.meter.id or 0) for m in items])
    return {m.meter.serial for m in items
            if all(o.hes_status in (None, "timeout") for o in latest.get(int(m.meter.id or 0),
                                                                          []))}


def finish(engine: Engine, settings: Settings, actor: Actor, report: Report,
           now: datetime) -> None:
    """Audit the run's totals and sign a checkpoint that anchors its events."""
    with transaction(engine) as session, Hsm.open(settings).session() as hsm:
        trail.record(session, actor, "claim.run", "ok", detail={
            "claimed": len(report.claimed), "recovered": len(report.recovered),
            "failed": len(report.failed), "waiting": len(report.waiting)}, at=now)
        trail.checkpoint(session, hsm, settings, at=now)


# --- a HES reached through files -------------------------------------------------------------
def export_orders(engine: Engine, actor: Actor, now: datetime) -> list[KeyOrder]:
    """Return every order still waiting for an outcome, and audit the export (count only).

    The orders carry wrapped keys and challenges, never a key in clear.
    """
    with transaction(engine) as session:
        # A meter's master order before its GUEK order: the GUEK is wrapped under the new
        # master, so a HES that runs the file in order must install the master first.
        sequence = list(OrderKind)
        waiting = sorted(claims.pending_orders(session), key=lambda o: (
            o.meter_id, o.attempt, sequence.index(OrderKind(o.kind))))
        by_id = {int(m.id or 0): m for m in claims.meters_by_id(
            session, sorted({o.meter_id for o in waiting}))}
        orders = [KeyOrder(o.order_id, by_id[o.meter_id].serial, by_id[o.meter_id].system_title,
                           by_id[o.meter_id].suite, bytes(o.key_data), bytes(o.challenge),
                           o.created_at) for o in waiting]
        trail.record(session, actor, "claim.export", "ok",
                     detail={"orders": len(orders), "meters": len(by_id)}, at=now)
    return orders


def record_rejected(engine: Engine, actor: Actor, name: str, rejected: Sequence[PortError],
                    now: datetime) -> None:
    """Audit the lines of a HES file that were refused: where each is, never its content (a
    line may carry anything)."""
    if not rejected:
        return
    with transaction(engine) as session:
        trail.record(session, actor, "claim.confirm", "rejected", at=now, detail={
            "file": name, "lines": len(rejected), "where": [e.where for e in rejected[:50]]})
