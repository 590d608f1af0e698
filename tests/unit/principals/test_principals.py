"""Who may do what: the permission table as a scenario table."""

from __future__ import annotations

import pytest

from lifecycle import principals
from lifecycle.principals import (
    AUDITOR,
    DUAL_CONTROL,
    OPERATOR,
    PERMISSIONS,
    ROLES,
    SECURITY_OFFICER,
    SYSTEM,
    may,
)

SO, OP, AU, SY = SECURITY_OFFICER, OPERATOR, AUDITOR, SYSTEM

SCENARIOS = [
    # HSM and vendor keys: the security officer only.
    pytest.param(SO, "hsm.init", True, id="so-hsm-init"),
    pytest.param(OP, "hsm.init", False, id="operator-no-hsm-init"),
    pytest.param(AU, "hsm.init", False, id="auditor-no-hsm-init"),
    pytest.param(SO, "hsm.backup", True, id="so-hsm-backup"),
    pytest.param(OP, "hsm.backup", False, id="operator-no-hsm-backup"),
    pytest.param(SO, "hsm.restore", True, id="so-hsm-restore"),
    pytest.param(OP, "hsm.restore", False, id="operator-no-hsm-restore"),
    pytest.param(AU, "hsm.restore", False, id="auditor-no-hsm-restore"),
    pytest.param(SO, "vendor.add", True, id="so-vendor-add"),
    pytest.param(OP, "vendor.add", False, id="operator-no-vendor-add"),
    pytest.param(SO, "vendor.import-key", True, id="so-vendor-import-key"),
    pytest.param(OP, "vendor.import-key", False, id="operator-no-vendor-import-key"),
    pytest.param(AU, "vendor.import-key", False, id="auditor-no-vendor-import-key"),
    # Daily work: operators import and read meters.
    pytest.param(OP, "batch.import", True, id="operator-batch-import"),
    pytest.param(SO, "batch.import", True, id="so-batch-import"),
    pytest.param(AU, "batch.import", False, id="auditor-no-batch-import"),
    pytest.param(OP, "meter.read", True, id="operator-meter-read"),
    pytest.param(AU, "meter.read", True, id="auditor-meter-read"),
    pytest.param(SO, "meter.read", True, id="so-meter-read"),
    pytest.param(OP, "audit.checkpoint", True, id="operator-audit-checkpoint"),
    pytest.param(AU, "audit.checkpoint", False, id="auditor-no-audit-checkpoint"),
    # Review: auditors read and verify the trail; operators do not.
    pytest.param(AU, "audit.read", True, id="auditor-audit-read"),
    pytest.param(AU, "audit.verify", True, id="auditor-audit-verify"),
    pytest.param(OP, "audit.read", False, id="operator-no-audit-read"),
    pytest.param(OP, "audit.verify", False, id="operator-no-audit-verify"),
    pytest.param(SO, "audit.verify", True, id="so-audit-verify"),
    pytest.param(AU, "principal.read", True, id="auditor-principal-read"),
    pytest.param(OP, "principal.read", False, id="operator-no-principal-read"),
    # Principals and ceremonies: the security officer only.
    pytest.param(SO, "principal.enrol", True, id="so-principal-enrol"),
    pytest.param(OP, "principal.enrol", False, id="operator-no-principal-enrol"),
    pytest.param(AU, "principal.enrol", False, id="auditor-no-principal-enrol"),
    pytest.param(SO, "principal.disable", True, id="so-principal-disable"),
    pytest.param(OP, "principal.disable", False, id="operator-no-principal-disable"),
    pytest.param(SO, "pki.ceremony", True, id="so-pki-ceremony"),
    pytest.param(OP, "pki.ceremony", False, id="operator-no-pki-ceremony"),
    # The system principal (the scheduled runs): checkpoint, verify, publish CRLs, nothing else.
    pytest.param(SY, "audit.checkpoint", True, id="system-audit-checkpoint"),
    pytest.param(SY, "audit.verify", True, id="system-audit-verify"),
    pytest.param(SY, "pki.crl", True, id="system-pki-crl"),
    pytest.param(SY, "pki.revoke", False, id="system-no-pki-revoke"),
    pytest.param(SY, "meter.claim", False, id="system-no-meter-claim"),
    pytest.param(SY, "batch.import", False, id="system-no-batch-import"),
    pytest.param(SY, "meter.read", False, id="system-no-meter-read"),
    pytest.param(SY, "audit.read", False, id="system-no-audit-read"),
    pytest.param(SY, "principal.enrol", False, id="system-no-principal-enrol"),
    # No role (unknown or disabled principal), or a role that does not exist: nothing.
    pytest.param(None, "meter.read", False, id="none-no-meter-read"),
    pytest.param(None, "audit.read", False, id="none-no-audit-read"),
    pytest.param("root", "hsm.init", False, id="unknown-role-no-hsm-init"),
    pytest.param("Security-Officer", "hsm.init", False, id="role-case-matters"),
]


@pytest.mark.parametrize(("who", "action", "allowed"), SCENARIOS)
def test_who_may_do_what(who: str | None, action: str, allowed: bool) -> None:
    assert may(who, action) is allowed


def test_required_actions_are_in_the_table() -> None:
    required = {"hsm.init", "hsm.backup", "hsm.restore", "vendor.add", "vendor.import-key",
                "batch.import", "meter.read", "audit.read", "audit.verify", "principal.enrol",
                "principal.disable", "pki.ceremony"}
    assert required <= set(PERMISSIONS)


def test_security_officer_may_do_everything() -> None:
    assert [a for a in PERMISSIONS if not may(SO, a)] == []


def test_auditor_only_reads() -> None:
    allowed = {a for a in PERMISSIONS if may(AU, a)}
    assert allowed == {"meter.read", "audit.read", "audit.verify", "inventory.verify",
                       "principal.read"}


def test_system_only_checkpoints_verifies_and_publishes_crls() -> None:
    assert {a for a in PERMISSIONS if may(SY, a)} == {"audit.checkpoint", "audit.verify",
                                                      "pki.crl"}


def test_dual_control_actions_are_security_officers_only() -> None:
    assert set(PERMISSIONS) >= DUAL_CONTROL
    assert {a for a in DUAL_CONTROL if PERMISSIONS[a] != {SO}} == set()
    assert {"principal.enrol", "principal.disable", "hsm.backup", "hsm.restore"} <= DUAL_CONTROL


def test_every_role_in_the_table_exists() -> None:
    assert set().union(*PERMISSIONS.values()) <= set(ROLES)


def test_unknown_action_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown action"):
        may(SO, "audit.delete")


def test_no_action_rewrites_the_trail() -> None:
    assert not [a for a in PERMISSIONS if a.startswith("audit.") and
                a not in {"audit.read", "audit.verify", "audit.checkpoint"}]
    assert principals.ROLES == ("security-officer", "operator", "auditor", "system")
