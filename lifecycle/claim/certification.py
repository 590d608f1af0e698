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

import secrets
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from lifecycle.audit import trail
from lifecycle.audit.chain import Actor
from lifecycle.claim.certificate_request import check_request
from lifecycle.claim.steps import _WRITE_LOCK, Report, Selection, _event
from lifecycle.config import Settings
from lifecycle.errors import ClaimError, PkiError
from lifecycle.hes.port import CertificateOrder, Hes, MeterRef
from lifecycle.hsm.pool import HsmWorkers
from lifecycle.inventory import certificates, claims
from lifecycle.inventory.claims import MeterRow
from lifecycle.inventory.db import Engine, transaction
from lifecycle.inventory.meters import MeterState
from lifecycle.pki import profiles
from lifecycle.pki import steps as pki
from lifecycle.pki.issuing import DeviceRequest, Issued, IssueJob, Issuer, issue_job
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
    with transaction(engine) as session:
        ids = claims.select_meter_ids(session, batch_id=selection.batch_id,
                                      vendor=selection.vendor, serials=selection.serials,
                                      states=(MeterState.OPERATIONAL,))
        found = claims.meter_rows(session, ids)
        orders = claims.certificate_orders_of(session, ids)
    return [int(m.id or 0) for m in found if m.suite in CERTIFIED_SUITES
            and not any(o.status == DELIVERED for o in orders.get(int(m.id or 0), []))]


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
                      events: list[dict[str, Any]]) -> dict[str, list[DeviceRequest]]:
    """Ask the HES for the meters' requests and check them: device CA name -> requests."""
    answers = hes.certificate_requests(
        [MeterRef(m.serial, m.system_title, m.suite) for m in meters]) if meters else {}
    out: dict[str, list[DeviceRequest]] = {}
    for meter in meters:
        pair = answers.get(meter.serial)
        try:
            if pair is None:
                raise ClaimError(f"meter {meter.serial}", "the HES returned no certificate "
                                                          "request")
            checked = [DeviceRequest(meter.system_title, check_request(
                meter.serial, meter.system_title, meter.suite, usage, der), usage, meter.serial)
                for usage, der in zip(profiles.USAGES, pair, strict=True)]
        except ClaimError as exc:
            report.uncertified[meter.serial] = exc.reason
            events.append(_event("claim.certify", "refused", meter.serial,
                                 {"reason": exc.reason[:200]}))
            continue
        ca_name = profiles.DEVICE_CA_OF_CURVE[str(SUITES[meter.suite].curve)]
        out.setdefault(ca_name, []).extend(checked)
    return out


def _issue(workers: HsmWorkers, settings: Settings, engine: Engine,
           by_ca: dict[str, list[DeviceRequest]], report: Report,
           events: list[dict[str, Any]], now: datetime) -> list[tuple[Issuer, list[Issued]]]:
    # Each CA's requests are split over the workers (at most ISSUE_CHUNK a job) and submitted
    # together, so the workers sign in parallel; a meter's two requests stay in one job.
    jobs: list[tuple[Issuer, Future[list[Issued]]]] = []
    for ca_name, wanted in by_ca.items():
        try:
            who = pki.issuer(settings, engine, ca_name)
        except PkiError as exc:
            for serial in sorted({str(r.meter_serial) for r in wanted}):
                report.uncertified[serial] = exc.reason
                events.append(_event("claim.certify", "failed", serial,
                                     {"reason": exc.reason[:200]}))
            continue
        share = -(-len(wanted) // max(1, workers.workers))
        size = min(pki.ISSUE_CHUNK, share + share % 2)
        for start in range(0, len(wanted), size):
            part = tuple(wanted[start:start + size])
            jobs.append((who, workers.submit(issue_job, IssueJob(who, part, now))))
    return [(who, workers.result(future)) for who, future in jobs]


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
        order = CertificateOrder(f"CC-{secrets.token_hex(8).upper()}", meter.serial,
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
