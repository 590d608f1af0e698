"""The flows of meterkeys, and the action each flow's runs are authorised for.

``APPROVALS`` maps a flow's name to the flow and its action: ``meterkeys approve RUN_ID``
signs that action over the run's parameters (all of them but ``request``, defaults included),
exactly as the flow checks them.
"""

from __future__ import annotations

from typing import Any

from flows import audit_checkpoint as _audit_checkpoint
from flows import factory_import as _factory_import
from flows import ownership_claim as _ownership_claim
from flows import pki_crl as _pki_crl

APPROVALS: dict[str, tuple[Any, str]] = {
    flow.name: (flow, action) for flow, action in (
        (_factory_import.factory_import, _factory_import.ACTION),
        (_audit_checkpoint.audit_checkpoint, _audit_checkpoint.ACTION),
        (_ownership_claim.ownership_claim, _ownership_claim.ACTION),
        (_pki_crl.publish_crls, _pki_crl.ACTION),
    )
}
