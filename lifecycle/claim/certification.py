"""Operational certificates for claimed suite 1/2 meters: requests checked, issued, delivered.

After a meter proved the DSO's keys (``lifecycle.claim.steps``), it is asked through the HES
for a certificate request per use (``Hes.certificate_requests``: DLMS Security Setup methods 4
and 5), over the channel the DSO's keys now secure, so the manufacturer cannot answer for it.

1. ``select_uncertified``: the selection's operational suite 1/2 meters whose certificates were
   never delivered.
2. ``certify``: meters with certificates issued but not delivered (a run killed in between) get
   the same certificates again; the others are asked for requests, each checked
   (``certificate_request.check_request``), and the keys certified by the device CA of the
   meter's curve in the HSM workers (``lifecycle.pki.issuing.issue_job``, batches). The issued
   certificates, the certificate orders and the audit events (serials in decimal) commit in one
   transaction; then the HES imports them (Security Setup method 6) and the orders are marked
   delivered.

A refused request changes nothing: the meter stays operational without certificates, the reason
goes to the run's report and the audit trail, and the next run asks again.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.claim.certificate_request import (
    Certified,
    CertifyJob,
    MeterRequests,
    certify_job,
)
from lifecycle.claim.steps import _WRITE_LOCK, Report, Selection, _event
from lifecycle.config import Settings
from lifecycle.errors import ClaimError, PkiError
from lifecycle.hes.port import (
    CertificateImport,
    CertificateOrder,
    CertificateRequests,
    Hes,
    ImportStatus,
    MeterRef,
    new_order_id,
)
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.inventory import certificates, claims
from lifecycle.inventory.claims import MeterRow
from lifecycle.inventory.db import Engine, refresh_statistics, transaction
from lifecycle.inventory.meters import MeterState
from lifecycle.pki import profiles
from lifecycle.pki import steps as pki
from lifecycle.pki.issuing import Issued, Issuer
from lifecycle.policy import SUITES

CERTIFIED_SUITES = tuple(n for n, s in SUITES.items() if s.needs_certificate)
PENDING, DELIVERED = "pending", "delivered"


def select_uncertified(engine: Engine, selection: Selection) -> list[int]:
    """Return the ids of the selection's operational suite 1/2 meters whose certificates were
    never delivered, by serial.

    Raises:
        ClaimError: the selection names none or several kinds.
    """
    selection.check()
    with transaction(engine) as session:  # one query: at the end of every claim run
        return claims.select_meter_ids(session, batch_id=selection.batch_id,
                                       vendor=selection.vendor, serials=selection.serials,
                                       states=(MeterState.OPERATIONAL,),
                                       suites=CERTIFIED_SUITES, no_certificate_order=DELIVERED)


def certify(workers: HsmWorkers, hes: Hes, engine: Engine, settings: Settings, actor: Actor,
            meter_ids: Sequence[int], now: datetime) -> Report:
    """Issue and deliver the operational certificates of claimed suite 1/2 meters.

    Raises:
        HsmError: the HSM failed as a whole.
    """
    report = Report()
    with transaction(engine) as session:
        found = [m for m in claims.meter_rows(session, meter_ids)
                 if m.state == MeterState.OPERATIONAL and m.suite in CERTIFIED_SUITES]
        orders = claims.certificate_orders_of(session, [int(m.id or 0) for m in found])
        again = [_order_again(session, m, o) for m in found
                 for o in orders.get(int(m.id or 0), []) if o.status == PENDING]
    asked = [m for m in found if not orders.get(int(m.id or 0))]
    events: list[dict[str, Any]] = []
    requests = _checked_requests(hes, asked, report, events)
    issued = _issue(workers, settings, engine, requests, report, events, now)
    fresh = _record(engine, settings, actor, asked, issued, events, now)
    refresh_statistics(engine)
    _deliver(hes, engine, actor, [*again, *fresh], report, now)
    return report


def _order_again(session: Any, meter: MeterRow, order: Any) -> CertificateOrder:
    pair = [certificates.get_issued(session, s) for s in (order.signature_serial,
                                                          order.key_agreement_serial)]
    if pair[0] is None or pair[1] is None:
        raise ClaimError(f"meter {meter.serial}", f"certificate order {order.order_id} names a "
                                                  "certificate that is not in the inventory")
    return CertificateOrder(order.order_id, meter.serial, meter.system_title,
                            bytes(pair[0].der), bytes(pair[1].der), order.created_at)


def _checked_requests(hes: Hes, meters: Sequence[MeterRow], report: Report,
                      events: list[dict[str, Any]]) -> dict[str, list[MeterRequests]]:
    """Ask the HES for the meters' requests: device CA name -> each meter's two requests."""
    answers = hes.certificate_requests(
        [MeterRef(m.serial, m.system_title, m.suite) for m in meters]) if meters else {}
    return _checked(answers, meters, report, events)


def _checked(answers: CertificateRequests, meters: Sequence[MeterRow], report: Report,
             events: list[dict[str, Any]]) -> dict[str, list[MeterRequests]]:
    """Group the meters' requests among ``answers`` by device CA (checked in the workers, by
    ``certify_job``); a meter without requests is refused here."""
    out: dict[str, list[MeterRequests]] = {}
    for meter in meters:
        pair = answers.get(meter.serial)
        if pair is None:
            _refuse(report, events, meter.serial, "refused",
                    "the HES returned no certificate request")
            continue
        ca_name = profiles.DEVICE_CA_OF_CURVE[str(SUITES[meter.suite].curve)]
        out.setdefault(ca_name, []).append(MeterRequests(meter.serial, meter.system_title,
                                                         meter.suite, *pair))
    return out


def _refuse(report: Report, events: list[dict[str, Any]], serial: str, outcome: str,
            reason: str) -> None:
    report.uncertified[serial] = reason
    events.append(_event("claim.certify", outcome, serial, {"reason": reason[:200]}))


def _issue(workers: HsmWorkers, settings: Settings, engine: Engine,
           by_ca: dict[str, list[MeterRequests]], report: Report,
           events: list[dict[str, Any]], now: datetime) -> list[tuple[Issuer, list[Issued]]]:
    # Each CA's meters are split over the workers (at most ISSUE_CHUNK certificates a job) and
    # submitted together, so the workers check and sign in parallel.
    jobs: list[tuple[Issuer, Future[Certified]]] = []
    for ca_name, wanted in by_ca.items():
        try:
            who = pki.issuer(settings, engine, ca_name)
        except PkiError as exc:
            for meter in sorted(wanted, key=lambda m: m.serial):
                _refuse(report, events, meter.serial, "failed", exc.reason)
            continue
        size = min(pki.ISSUE_CHUNK // 2, -(-len(wanted) // max(1, workers.workers)))
        for start in range(0, len(wanted), size):
            part = tuple(wanted[start:start + size])
            jobs.append((who, workers.submit(certify_job, CertifyJob(who, part, now))))
    out = []
    for who, future in jobs:
        done = workers.result(future)
        for serial, reason in sorted(done.refused.items()):
            _refuse(report, events, serial, "refused", reason)
        out.append((who, done.issued))
    return out


def _record(engine: Engine, settings: Settings, actor: Actor, meters: Sequence[MeterRow],
            issued: Sequence[tuple[Issuer, list[Issued]]], events: list[dict[str, Any]],
            now: datetime) -> list[CertificateOrder]:
    by_meter: dict[str, dict[str, tuple[Issuer, Issued]]] = {}
    for who, chunk in issued:
        for cert in chunk:
            by_meter.setdefault(str(cert.meter_serial), {})[cert.usage] = (who, cert)
    orders: list[CertificateOrder] = []
    rows: list[dict[str, Any]] = []
    for meter in meters:
        pair = by_meter.get(meter.serial, {})
        if len(pair) != len(profiles.USAGES):
            continue
        (who, sig), (_, agree) = pair[profiles.SIGNATURE], pair[profiles.KEY_AGREEMENT]
        order = CertificateOrder(new_order_id("CC"), meter.serial,
                                 meter.system_title, sig.der, agree.der, now)
        orders.append(order)
        rows.append({"order_id": order.order_id, "meter_id": meter.id,
                     "signature_serial": str(sig.serial),
                     "key_agreement_serial": str(agree.serial), "status": PENDING,
                     "created_at": now, "delivered_at": None})
        # JSON integers: the trail refuses 32 hex-class digits in a string (key material?),
        # and a 159-bit serial has 48 decimal digits.
        events.append(_event("claim.certify", "ok", meter.serial, {
            "order": order.order_id, "ca": who.ca_name, "generation": who.generation,
            "signature_serial": sig.serial, "agreement_serial": agree.serial,
            "not_after": sig.not_after.isoformat()}))
    with _WRITE_LOCK, transaction(engine) as session:
        for who, chunk in issued:
            pki.record_issued_in(session, actor, who, chunk, now)
        claims.add_certificate_orders(session, rows)
        trail.record_many(session, actor, events, at=now)
    return orders


def _deliver(hes: Hes, engine: Engine, actor: Actor, orders: Sequence[CertificateOrder],
             report: Report, now: datetime) -> None:
    if not orders:
        return
    hes.import_certificates(orders)
    with _WRITE_LOCK, transaction(engine) as session:
        claims.deliver_certificate_orders(session, [o.order_id for o in orders], now)
        trail.record(session, actor, "claim.certificates.deliver", "ok",
                     detail={"orders": len(orders), "meters": len({o.meter_serial
                                                                   for o in orders})}, at=now)
    report.certified += [o.meter_serial for o in orders]


# --- a HES reached through files (meterkeys orders export/confirm) ----------------------------
def export_work(engine: Engine, actor: Actor, now: datetime
                ) -> tuple[list[MeterRef], list[CertificateOrder]]:
    """Return the certificate work for a HES, and audit its export (counts only): the
    operational suite 1/2 meters with no certificate order yet (to be asked for requests), and
    the certificate orders issued but not delivered (their certificates again).

    Raises:
        ClaimError: a certificate order names a certificate missing from the inventory.
    """
    with transaction(engine) as session:
        ids = claims.select_meter_ids(session, states=(MeterState.OPERATIONAL,))
        found = [m for m in claims.meter_rows(session, ids) if m.suite in CERTIFIED_SUITES]
        orders = claims.certificate_orders_of(session, [int(m.id or 0) for m in found])
        again = [_order_again(session, m, o) for m in found
                 for o in orders.get(int(m.id or 0), []) if o.status == PENDING]
        asks = [MeterRef(m.serial, m.system_title, m.suite) for m in found
                if not orders.get(int(m.id or 0))]
        trail.record(session, actor, "claim.certificates.export", "ok",
                     detail={"asks": len(asks), "orders": len(again)}, at=now)
    return asks, again


def certify_from_requests(workers: HsmWorkers, engine: Engine, settings: Settings,
                          actor: Actor, answers: CertificateRequests, now: datetime
                          ) -> tuple[Report, list[CertificateOrder]]:
    """Certify the meters whose requests a HES answered in a file (checked, issued in the HSM,
    recorded with pending certificate orders, as ``certify`` does); return the report and the
    new orders, which the next export offers the HES.

    A serial that is no operational suite 1/2 meter, or one whose certificates were issued
    already (a file confirmed twice), changes nothing and is audited.

    Raises:
        HsmError: the HSM failed as a whole.
    """
    report = Report()
    events: list[dict[str, Any]] = []
    with transaction(engine) as session:
        ids = claims.select_meter_ids(session, serials=sorted(answers),
                                      states=(MeterState.OPERATIONAL,)) if answers else []
        found = [m for m in claims.meter_rows(session, ids) if m.suite in CERTIFIED_SUITES]
        orders = claims.certificate_orders_of(session, [int(m.id or 0) for m in found])
    asked = [m for m in found if not orders.get(int(m.id or 0))]
    issued_before = {m.serial for m in found if orders.get(int(m.id or 0))}
    for serial in sorted(set(answers) - {m.serial for m in asked}):
        reason = "certificates already issued" if serial in issued_before else \
            "no operational suite 1/2 meter of this serial"
        events.append(_event("claim.certify", "ignored", serial, {"reason": reason}))
    requests = _checked(answers, asked, report, events)
    issued = _issue(workers, settings, engine, requests, report, events, now)
    fresh = _record(engine, settings, actor, asked, issued, events, now)
    return report, fresh


def delivery(order_status: str | None, imported: ImportStatus) -> tuple[str, str]:
    """Decide what a HES's import report does to a certificate order (None: no such order of
    that meter): ``(outcome, reason)``, outcome ``ok`` (delivered), ``failed`` (stays
    pending, offered again) or ``ignored`` (nothing changes)."""
    if order_status is None:
        return "ignored", "unknown certificate order for this meter"
    if order_status != PENDING:
        return "ignored", f"certificate order already {order_status}"
    if imported != "ok":
        return "failed", "the HES could not import the certificates: they are offered again"
    return "ok", ""


def confirm_imports(engine: Engine, actor: Actor, imports: Sequence[CertificateImport],
                    now: datetime) -> Report:
    """Mark certificate orders delivered as a HES reports their import (``delivery``
    decides); every report is audited, and one that changes nothing says why."""
    report = Report()
    if not imports:
        return report
    with _WRITE_LOCK, transaction(engine) as session:
        ids = claims.select_meter_ids(session, serials=sorted({i.meter_serial for i in imports}))
        serial_of = {int(m.id or 0): m.serial for m in claims.meter_rows(session, ids)}
        orders = {o.order_id: o for group in claims.certificate_orders_of(session, ids).values()
                  for o in group}
        delivered: list[str] = []
        events: list[dict[str, Any]] = []
        for imported in imports:
            order = orders.get(imported.order_id)
            mine = order is not None and serial_of.get(order.meter_id) == imported.meter_serial
            outcome, reason = delivery(order.status if order and mine else None, imported.status)
            events.append(_event("claim.certificates.import", outcome, imported.meter_serial,
                                 {"order": imported.order_id, "hes_status": imported.status,
                                  "reason": reason}))
            if outcome == "ok":
                delivered.append(imported.order_id)
                report.certified.append(imported.meter_serial)
            elif outcome == "failed":
                report.uncertified[imported.meter_serial] = reason
        claims.deliver_certificate_orders(session, delivered, now)
        trail.record_many(session, actor, events, at=now)
    return report
