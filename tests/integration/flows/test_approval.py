"""Runs started from the Prefect UI wait for a signed approval; scheduled runs act as the
system principal; `meterkeys import --submit` hands over a signed request.

Real Prefect (the session's test server), real token, real inventory. The deployments are
registered as `meterkeys serve` registers them, but not served: each test executes the runs
it creates itself, in a thread of this process (as the serving process would, in a child), so
that it can approve them, tamper with them and read their outcome.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.deployments import run_deployment
from prefect.flow_engine import run_flow
from prefect.flow_runs import resume_flow_run
from prefect.schedules import Interval

from cli import approve, common
from cli.approve import approve_run
from cli.submit import submit_import
from deployments.serve import FACTORY_IMPORT, deployments
from flows.audit_checkpoint import audit_checkpoint
from flows.factory_import import factory_import
from lifecycle import principals
from lifecycle.audit import trail
from lifecycle.clock import utcnow
from lifecycle.errors import AccessDenied, RequestError
from lifecycle.identity import keys, signers
from lifecycle.identity import request as signed_request
from lifecycle.inventory import db, meters
from lifecycle.inventory.audit_events import AuditEvent
from tasks import approval, context

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.timeout(120)]

WAIT = 30.0


# --- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(prefect_server: None) -> dict[str, uuid.UUID]:
    """The deployments of deployments/serve.py, registered with the API, by name."""
    return {d.name: d.apply() for d in deployments()}


@pytest.fixture
def use_key(fleet, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:  # type: ignore[no-untyped-def]
    """Make the command line sign with a test principal's key (METERKEYS_PRINCIPAL_KEY)."""

    def use(name: str) -> None:
        path = fleet.ids.key_path(name)
        monkeypatch.setenv("METERKEYS_PRINCIPAL_KEY", str(path))
        context.settings.cache_clear()
        common.signer.cache_clear()

    yield use
    common.signer.cache_clear()


class Execution:
    """A flow run executed in a thread of this process, as the serving process would."""

    def __init__(self, flow: Any, run: FlowRun) -> None:
        self.run = run
        self.state: State | None = None
        self._thread = threading.Thread(target=self._execute, args=(flow,), daemon=True)
        self._thread.start()

    def _execute(self, flow: Any) -> None:
        self.state = run_flow(flow, flow_run=self.run, parameters=self.run.parameters,
                              return_type="state")  # type: ignore[assignment]

    def result(self) -> State:
        self._thread.join(WAIT)
        assert self.state is not None, "the flow run did not finish in time"
        return self.state


def _ui_run(deployment: str, parameters: dict[str, Any]) -> FlowRun:
    """A run as the deployment's form in the Prefect UI creates it: no signed request."""
    return run_deployment(deployment, parameters=parameters, timeout=0)  # type: ignore[return-value]


def _wait_for(run_id: uuid.UUID, done: Callable[[State], bool]) -> FlowRun:
    deadline = time.monotonic() + WAIT
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and done(run.state):
                return run
            assert time.monotonic() < deadline, f"run stayed {run.state}"
            time.sleep(0.2)


def _paused_import(fleet, tmp_path: Path, count: int = 5) -> tuple[Execution, dict[str, Any]]:  # type: ignore[no-untyped-def]
    files = fleet.batch("acme", tmp_path, count)
    params = {"file": str(files.data), "vendor": "acme", "workers": 0}
    execution = Execution(factory_import, _ui_run(f"factory-import/{FACTORY_IMPORT}", params))
    _wait_for(execution.run.id, lambda s: s.is_paused())
    return execution, {**params, "mapping": None}


def _meter_count(fleet) -> int:  # type: ignore[no-untyped-def]
    with db.transaction(fleet.engine) as session:
        return meters.count_meters(session)


def _denials(fleet) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with db.snapshot(fleet.engine) as session:
        return [e for e in trail.events(session, limit=50) if e.outcome == "denied"]


def _logged(run_id: uuid.UUID, text: str) -> bool:
    """Whether the run's logs in the API hold ``text`` (they arrive in batches: wait a little)."""
    deadline = time.monotonic() + 10
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            if any(text in log.message for log in logs) or time.monotonic() > deadline:
                return any(text in log.message for log in logs)
            time.sleep(0.3)


# --- runs started from the UI --------------------------------------------------------------------
def test_ui_run_pauses_until_an_operator_approves_then_imports(fleet, registered, use_key,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    use_key("test-operator")
    execution, _ = _paused_import(fleet, tmp_path)
    run_id = execution.run.id
    assert _logged(run_id, f"run {run_id} waits for approval: meterkeys approve {run_id}")
    assert _meter_count(fleet) == 0

    approve_run(str(run_id), yes=True)

    state = execution.result()
    assert state.is_completed(), state.message
    assert state.result()["imported"] == 5  # type: ignore[index]
    with db.snapshot(fleet.engine) as session:
        accepted = trail.events(session, limit=50, action="request.accepted")
    assert [e.principal for e in accepted if e.flow_run_id == str(run_id)] == ["test-operator"]
    with pytest.raises(RequestError, match="not Paused"):  # nothing left to approve
        approve_run(str(run_id), yes=True)


def test_approval_signed_over_other_parameters_is_refused(fleet, registered,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    execution, params = _paused_import(fleet, tmp_path)
    # An attacker with access to the UI holds an approval for another file (or another run)
    # and resumes this run with it, as the UI's resume form allows.
    elsewhere = fleet.ids.requests(["test-operator"], "batch.import",
                                          {**params, "file": str(tmp_path / "other.csv")})
    resume_flow_run(execution.run.id, run_input={"request": elsewhere})

    state = execution.result()
    assert state.is_failed()
    with pytest.raises(AccessDenied, match="parameters differ"):
        state.result()
    assert _meter_count(fleet) == 0
    denied = _denials(fleet)
    assert denied and denied[0].action == "batch.import"
    assert "differ" in denied[0].detail


def test_garbage_pasted_into_the_resume_form_is_refused_and_audited(fleet, registered,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    execution, _ = _paused_import(fleet, tmp_path)
    resume_flow_run(execution.run.id, run_input={"request": '[{"request": "approve me"}]'})

    state = execution.result()
    assert state.is_failed()
    with pytest.raises(RequestError):
        state.result()
    assert _meter_count(fleet) == 0
    denied = _denials(fleet)
    assert denied and denied[0].action == "batch.import" and denied[0].principal == "unknown"


def test_approval_by_an_auditor_is_refused(fleet, registered, use_key,  # type: ignore[no-untyped-def]
                                           tmp_path: Path) -> None:
    use_key("test-auditor")
    execution, _ = _paused_import(fleet, tmp_path)

    approve_run(str(execution.run.id), yes=True)  # signs: the run is where roles are checked

    state = execution.result()
    assert state.is_failed()
    with pytest.raises(AccessDenied, match="may not perform 'batch.import'"):
        state.result()
    assert _meter_count(fleet) == 0
    assert [e.principal for e in _denials(fleet)][:1] == ["test-auditor"]


def test_approve_reads_the_parameters_as_the_flow_checks_them(registered) -> None:  # type: ignore[no-untyped-def]
    given = {"file": "/x/batch.csv", "vendor": "acme", "workers": "2", "request": None}
    assert approve.approval_params(factory_import, given, "run") == \
        {"file": "/x/batch.csv", "vendor": "acme", "mapping": None, "workers": 2}
    assert approve.approval_params(audit_checkpoint, {}, "run") == {}
    with pytest.raises(RequestError, match="do not fit the flow"):
        approve.approval_params(factory_import, {"vendor": "acme"}, "run")


# --- scheduled runs: the system principal --------------------------------------------------------
@pytest.fixture
def system_principal(fleet) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A system principal enrolled by the two security officers, its key where scheduled runs
    find it (beside the PIN, in the session's home)."""
    secrets = context.settings().secrets_dir
    key_file = secrets / approval.SYSTEM_KEY_FILE
    key_file.unlink(missing_ok=True)
    (secrets / "system-principal.pub.pem").unlink(missing_ok=True)
    _, pub = signers.generate(secrets, "system-principal", "p256", None)
    try:
        pem = keys.normalize_pem(pub.read_text(encoding="ascii"), str(pub))
        params = principals.enrolment_params("system", principals.SYSTEM, pem)
        requests = [fleet.ids.sign(so, "principal.enrol", params)
                    for so in ("test-so", "test-so-2")]
        principals.enrol(fleet.engine, fleet.settings, requests, "system", principals.SYSTEM,
                         pem, at=utcnow())
        yield "system"
    finally:
        key_file.unlink(missing_ok=True)
        pub.unlink(missing_ok=True)


def _scheduled_run(flow: Any, **parameters: Any) -> FlowRun:
    """A run created by a deployment's schedule (``auto_scheduled``), due now.

    The deployment is this test's own (an hourly schedule anchored in the past, carrying
    ``parameters``, as anyone with access to the API could add one); the server's own
    scheduling endpoint creates the run, as its scheduler does.
    """
    schedule = Interval(3600, anchor_date=datetime(2020, 1, 1, tzinfo=UTC),
                        parameters=parameters)
    deployment_id = flow.to_deployment(name=f"scheduled-{uuid.uuid4().hex[:8]}",
                                       schedules=[schedule]).apply()
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        client.request("POST", "/deployments/{id}/schedule",  # type: ignore[arg-type]
                       path_params={"id": deployment_id},
                       json={"start_time": (now - timedelta(hours=1)).isoformat(),
                             "end_time": now.isoformat(), "max_runs": 1}).raise_for_status()
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))
    due = [r for r in runs if r.auto_scheduled and r.expected_start_time
           and r.expected_start_time <= now]
    assert len(due) == 1, runs
    return due[0]


def test_scheduled_checkpoint_acts_as_the_system_principal(fleet, system_principal: str) -> None:  # type: ignore[no-untyped-def]
    run = _scheduled_run(audit_checkpoint)
    state = Execution(audit_checkpoint, run).result()
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome["events"] > 0 and outcome["checkpoint_seq"] is not None  # type: ignore[index]
    with db.snapshot(fleet.engine) as session:
        done = {e.action: e for e in trail.events(session, limit=20)
                if e.flow_run_id == str(run.id)}
    assert {"request.accepted", "audit.verify", "audit.checkpoint"} <= set(done)
    assert {(done[a].principal, done[a].role) for a in ("audit.verify", "audit.checkpoint")} == \
        {(system_principal, principals.SYSTEM)}


def test_scheduled_crl_publishing_acts_as_the_system_principal(fleet, system_principal: str,  # type: ignore[no-untyped-def]
                                                              ) -> None:
    from flows.pki_crl import publish_crls
    from lifecycle.pki import ceremony

    params = {"renew": []}
    signed = [fleet.ids.sign(so, "pki.ceremony", params) for so in ("test-so", "test-so-2")]
    ceremony.ceremony(fleet.settings, fleet.engine, principals.authorize(
        fleet.engine, fleet.settings, signed, "pki.ceremony", params, at=utcnow()))
    run = _scheduled_run(publish_crls)
    state = Execution(publish_crls, run).result()
    assert state.is_completed(), state.message
    assert state.result()["crls_issued"] >= 4  # type: ignore[index]  # the online CAs' first
    with db.snapshot(fleet.engine) as session:
        done = [e for e in trail.events(session, limit=50) if e.flow_run_id == str(run.id)]
    issued = [e for e in done if e.action == "pki.crl.issue"]
    assert issued and {(e.principal, e.role) for e in issued} == \
        {(system_principal, principals.SYSTEM)}


def test_the_system_principal_may_not_import(fleet, system_principal: str,  # type: ignore[no-untyped-def]
                                             tmp_path: Path) -> None:
    files = fleet.batch("acme", tmp_path, 5)
    run = _scheduled_run(factory_import, file=str(files.data), vendor="acme", workers=0)
    state = Execution(factory_import, run).result()
    assert state.is_failed()
    with pytest.raises(AccessDenied, match="may not perform 'batch.import'"):
        state.result()
    assert _meter_count(fleet) == 0
    assert [e.principal for e in _denials(fleet)][:1] == [system_principal]


def test_scheduled_run_without_a_system_key_fails_clearly(fleet) -> None:  # type: ignore[no-untyped-def]
    run = _scheduled_run(audit_checkpoint)
    state = Execution(audit_checkpoint, run).result()
    assert state.is_failed()
    with pytest.raises(Exception, match="acts as the system principal, but .* does not exist"):
        state.result()


# --- meterkeys import --submit -------------------------------------------------------------------
def test_submit_creates_a_run_holding_the_signed_request(fleet, registered, use_key,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path) -> None:
    use_key("test-operator")
    files = fleet.batch("acme", tmp_path, 5)

    run_id = submit_import(files.data, "acme", None, 0)

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
    params = {"file": str(Path(files.data).resolve()), "vendor": "acme", "mapping": None,
              "workers": 0}
    assert set(run.parameters) == {*params, "request"}
    [signed] = signed_request.decode(run.parameters["request"])
    assert (signed.request.principal, signed.request.action) == ("test-operator", "batch.import")
    assert signed.request.params_digest == signed_request.params_digest(params)
    stored = json.dumps(run.parameters)
    private_pem = fleet.ids.key_path("test-operator").read_text(encoding="ascii")
    body = "".join(private_pem.splitlines()[1:-1])
    for secret in (fleet.settings.user_pin(), body, body[:40], "PRIVATE KEY"):
        assert secret not in stored
    # The run does what was signed, as the served deployment would.
    state = Execution(factory_import, run).result()
    assert state.is_completed(), state.message
    assert state.result()["imported"] == 5  # type: ignore[index]
