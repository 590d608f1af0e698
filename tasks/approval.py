"""How a flow run obtains its authorisation: the one place, for every flow.

A run acts for the principal(s) whose signed request it holds, never for a name it is given.
It obtains that request in one of three ways:

- started with ``request`` (``meterkeys import``, ``meterkeys import --submit``): the command
  signed the run's parameters with the principal's key before the run existed;
- started from a deployment's form in the Prefect UI (``request`` empty): the run pauses and
  waits for a principal allowed to perform the action to sign its parameters
  (``meterkeys approve RUN_ID``), which sends the signed request back as the run's input;
- created by a deployment's schedule: the run acts as the system principal, whose key lies
  beside the PIN (``<home>/secrets/system-principal.key.pem``), in the flow-running process
  only. The system role may only checkpoint and verify the audit trail.

Either way the request is then checked against the run's OWN parameters
(``lifecycle.principals.authorize``): an approval signed over other parameters, by a principal
whose role may not perform the action, stale, replayed or for another installation is refused,
the refusal audited, and the run does nothing else.

Nothing here is secret: a signed request is a public statement (it may be a Prefect parameter
or run input, and it is recorded in the audit trail); the system key is read in this process
and never leaves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID, uuid4

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from lifecycle import principals
from lifecycle.audit.chain import Actor
from lifecycle.errors import ConfigError
from lifecycle.identity import request as signed_request
from lifecycle.identity.signers import FileSigner
from tasks import context

SYSTEM_KEY_FILE = "system-principal.key.pem"
POLL_SECONDS = 2  # how often a paused run asks the API whether it was resumed


class Approval(RunInput):
    """The run input ``meterkeys approve`` sends: the encoded list of signed requests."""

    request: str


def authorize_run(action: str, params: Mapping[str, Any], request: str | None) -> Actor:
    """Return the Actor the run acts for: its request checked against ``params``.

    Without a request the run either acts as the system principal (created by a schedule) or
    pauses until it is approved (started by hand from the Prefect UI).

    Raises:
        AccessDenied: the request is refused (the refusal is audited).
        RequestError: the request is malformed.
        ConfigError: a scheduled run finds no system principal key.
        FlowPauseTimeout: nobody approved the run in time.
    """
    if request is None:
        request = sign_as_system(action, dict(params)) if scheduled_run() else \
            await_approval(action)
    return authorize(action, dict(params), request)


@task(name="authorize", persist_result=False, cache_policy=NO_CACHE)
def authorize(action: str, params: dict[str, Any], request: str) -> Actor:
    """Check the signed request(s) against the action and this run's parameters (refusals are
    audited; a used nonce is refused as a replay)."""
    actor = principals.authorize_encoded(context.engine(), context.settings(), request, action,
                                         params, at=context.now(),
                                         flow_run_id=context.flow_run_id())
    get_run_logger().info("%s authorised for %s (role %s)", action, actor.principal, actor.role)
    return actor


def scheduled_run() -> bool:
    """Whether this flow run was created by a deployment's schedule.

    Prefect's scheduler sets ``auto_scheduled``; a client creating a run cannot. (Anyone with
    access to the API can still ask the server to schedule a deployment's runs: that is why
    the system role may do no more than checkpoint and verify the audit trail.)
    """
    run_id = context.flow_run_id()
    if run_id is None:
        return False
    with get_client(sync_client=True) as client:
        return bool(client.read_flow_run(UUID(run_id)).auto_scheduled)


@task(name="sign-as-system", persist_result=False, cache_policy=NO_CACHE)
def sign_as_system(action: str, params: dict[str, Any]) -> str:
    """Sign the request of a scheduled run with the system principal's key; return it encoded.

    Raises:
        ConfigError: the key file is absent or unreadable.
        AccessDenied: no enrolled principal holds the key.
    """
    settings = context.settings()
    path = settings.secrets_dir / SYSTEM_KEY_FILE
    if not path.is_file():
        raise ConfigError(f"a scheduled run acts as the system principal, but {path} does not "
                          "exist: generate the system principal's key there and enrol it "
                          "(role system)")
    signed = principals.sign(context.engine(), FileSigner.load(path, None), action, params,
                             at=context.now())
    get_run_logger().info("scheduled run: %s signed by the system principal %s", action,
                          signed.request.principal)
    return signed_request.encode([signed])


def await_approval(action: str) -> str:
    """Pause the run until ``meterkeys approve`` resumes it with a signed request; return it.

    Raises:
        FlowPauseTimeout: not resumed within ``approval_timeout_seconds``.
    """
    run_id = context.flow_run_id()
    roles = ", ".join(sorted(principals.PERMISSIONS[action]))
    message = (f"run {run_id} waits for approval: meterkeys approve {run_id} "
               f"(by a principal allowed to {action}: {roles})")
    get_run_logger().warning(message)
    # A key of its own for each pause: the run input is stored under it, and a retried run
    # (Prefect's Retry button) must wait for a new approval, not load the one already used.
    approval = pause_flow_run(wait_for_input=Approval.with_initial_data(description=message),
                              timeout=context.settings().approval_timeout_seconds,
                              poll_interval=POLL_SECONDS, key=f"approval-{uuid4().hex[:12]}")
    return approval.request
