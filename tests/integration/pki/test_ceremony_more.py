"""The ceremony's remaining parts: a sub-CA revoked by the root, a failed ceremony run again,
the root token kept out of the online backup, and the scheduled CRL publishing flow."""

from __future__ import annotations

import multiprocessing
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from lifecycle.audit.chain import Actor
from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.errors import PkiError
from lifecycle.hsm import provision, softhsm_backup
from lifecycle.installation import steps as installation
from lifecycle.inventory.db import make_engine
from lifecycle.pki import ceremony, profiles, signing, steps
from lifecycle.pki.issuing import DeviceRequest
from tests.identities import OPERATOR

from .conftest import Pki, officers_authorize

P256 = profiles.DEVICE_P256
SPAWN = multiprocessing.get_context("spawn")


def _issue(pki: Pki, title: str) -> Any:
    spki = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    (cert,) = steps.issue(pki.fleet.settings, pki.fleet.engine, pki.actor, P256,  # type: ignore[attr-defined]
                          [DeviceRequest(title, spki, profiles.SIGNATURE)], utcnow())
    return cert


def test_a_revoked_sub_ca_is_on_the_root_crl_and_issues_no_more(pki: Pki,
                                                               tmp_path: Path) -> None:
    fleet = pki.fleet
    old = _issue(pki, "4D4B530000000201")
    steps.issue_crl(fleet.settings, fleet.engine, pki.actor, P256, utcnow())  # type: ignore[attr-defined]
    params = {"renew": [], "revoke": [f"{P256}:1"], "reason": "key-compromise"}
    actor = officers_authorize(fleet, "pki.ceremony", params)
    report = ceremony.ceremony(fleet.settings, fleet.engine, actor, revoke=params["revoke"],  # type: ignore[attr-defined]
                               reason="key-compromise")
    assert report.revoked == (f"{P256}:1",) and report.made == {P256: 2}
    with pytest.raises(PkiError, match="device-p256 generation 1.*revoked"):
        steps.issuer(fleet.settings, fleet.engine, P256, 1)  # type: ignore[attr-defined]
    # A database writer marks it active again: the trail still says revoked.
    with fleet.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("UPDATE ca_certificate SET status = 'active' WHERE ca_name = :ca AND "
                          "generation = 1"), {"ca": P256})
    with pytest.raises(PkiError, match="revoked"):
        steps.issuer(fleet.settings, fleet.engine, P256, 1)  # type: ignore[attr-defined]
    assert [c.generation for c in steps.issue_crl(fleet.settings, fleet.engine, pki.actor,  # type: ignore[attr-defined]
                                                  P256, utcnow())] == [2]
    with pytest.raises(PkiError, match="revoked already"):
        ceremony.ceremony(fleet.settings, fleet.engine, actor, revoke=params["revoke"])  # type: ignore[attr-defined]
    out = tmp_path / "export"
    steps.export(fleet.engine, out)  # type: ignore[attr-defined]
    root_crl = x509.load_pem_x509_crl((out / "root-1.crl.pem").read_bytes())
    ca1 = x509.load_pem_x509_certificate((out / f"{P256}-1.pem").read_bytes())
    entry = root_crl.get_revoked_certificate_by_serial_number(ca1.serial_number)
    assert entry is not None
    chain = tmp_path / "chain.pem"
    chain.write_bytes((out / "root-1.pem").read_bytes() + (out / f"{P256}-1.pem").read_bytes())
    crls = tmp_path / "crls.pem"
    crls.write_bytes((out / "root-1.crl.pem").read_bytes()
                     + (out / f"{P256}-1.crl.pem").read_bytes())
    leaf = tmp_path / "old.pem"
    leaf.write_bytes(x509.load_der_x509_certificate(old.der).public_bytes(
        serialization.Encoding.PEM))
    result = subprocess.run(["openssl", "verify", "-CAfile", str(chain), "-crl_check_all",
                             "-CRLfile", str(crls), str(leaf)], capture_output=True, text=True,
                            check=False)
    assert result.returncode != 0 and "revoked" in result.stdout + result.stderr


def test_a_ceremony_that_failed_after_making_the_root_key_reuses_it(
        fleet, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    actor = officers_authorize(fleet, "pki.ceremony", {"renew": []})
    real = signing.sign_certificates
    seen: list[bytes] = []

    def fail_once(signer: Any, label: str, curve: str, tbs: Any, issuer: Any) -> list[bytes]:
        if not seen:
            seen.append(label.encode())
            raise PkiError("certificate", "the ceremony died here (test)")
        return real(signer, label, curve, tbs, issuer)

    monkeypatch.setattr(signing, "sign_certificates", fail_once)
    with pytest.raises(PkiError, match="died here"):
        ceremony.ceremony(fleet.settings, fleet.engine, actor)
    report = ceremony.ceremony(fleet.settings, fleet.engine, actor)
    assert report.made[profiles.ROOT] == 1
    with fleet.engine.connect() as conn:
        (label,) = conn.execute(text("SELECT key_label FROM ca_certificate WHERE ca_name = "
                                     "'root'")).one()
    assert seen == [label.encode()] == [profiles.root_key_label().encode()]
    root = ceremony.root_token_settings(fleet.settings)
    assert _in_child(_root_keys, root.model_dump(exclude={"pin", "so_pin"})) == [label]


def _root_keys(fields: dict[str, Any]) -> list[str]:
    """In a fresh process (it sees the root token): the root token's private keys' labels."""
    import pkcs11

    s = Settings(**fields)
    token = pkcs11.lib(str(s.module_path)).get_token(token_label=s.token_label)
    with token.open(user_pin=s.user_pin()) as session:
        return sorted(k.label for k in session.get_objects(
            {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}))


def _in_child(fn: Any, *args: Any) -> Any:
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        return pool.submit(fn, *args).result(timeout=120)


def _init_home(home: str, db_url: str) -> str:
    installation.init(Settings(home=Path(home)), make_engine(db_url), make_pin_files=False)
    return "ok"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_backup_leaves_the_root_token_out_and_a_restore_keeps_it(
        tmp_path: Path, db_url: str, engine: Any) -> None:
    home = Settings(home=tmp_path / "home")
    provision.generate_pin_files(home)
    provision.init_token(home)
    assert _in_child(_init_home, str(tmp_path / "home"), db_url) == "ok"
    root = ceremony.root_token_settings(home)
    assert ceremony._ensure_root_token(root)  # as the first ceremony makes it
    (root_dir,) = softhsm_backup.other_tokens(home.token_dir, home.token_label)
    assert softhsm_backup.token_label_of(root_dir) == home.root_token_label
    root_files = {p.relative_to(home.token_dir).as_posix() for p in root_dir.rglob("*")}
    officer = Actor("test-officer", "security-officer")
    made = installation.backup(home, engine, officer, tmp_path / "backups")
    copied = {p.relative_to(made.path / "tokens").as_posix()
              for p in (made.path / "tokens").rglob("*")}
    assert copied and not copied & root_files
    assert not [p for p in copied if p.startswith(root_dir.name)]
    before = {p.name: p.read_bytes() for p in root_dir.iterdir() if p.is_file()
              and p.name != ".meterkeys.lock"}
    installation.restore(home, engine, officer, made.path, force=False)
    after = {p.name: p.read_bytes() for p in root_dir.iterdir() if p.is_file()
             and p.name != ".meterkeys.lock"}
    assert after == before


def test_publish_crls_issues_what_is_due_and_publishes(pki: Pki, prefect_server: None) -> None:
    from flows.pki_crl import publish_crls

    fleet = pki.fleet
    steps.issue_crl(fleet.settings, fleet.engine, pki.actor, P256, utcnow())  # type: ignore[attr-defined]
    signed = fleet.ids.requests([OPERATOR], "pki.crl", {})  # type: ignore[attr-defined]
    state = publish_crls(request=signed, return_state=True)
    assert state.is_completed(), state.message
    # device-p256 has a fresh CRL; device-p384, maintenance and firmware had none.
    assert state.result() == {"crls_issued": 3, "files": 2 * len(profiles.CAS)}
    folder = fleet.settings.publish_path  # type: ignore[attr-defined]
    assert (folder / f"{P256}-1.crl.pem").exists() and (folder / "root-1.pem").exists()
    with fleet.engine.connect() as conn:  # type: ignore[attr-defined]
        actions = [r[0] for r in conn.execute(text(
            "SELECT action FROM audit_event WHERE action IN ('pki.publish', 'pki.crl.issue') "
            "ORDER BY seq"))]
    assert actions[-1] == "pki.publish" and actions.count("pki.crl.issue") == 1 + 1 + 3
