"""A principal whose key lives on a smart card (a PKCS#11 token of its own): enrol, authorize.

The card is a second SoftHSM2 token in a token directory of its own, initialised as
``meterkeys hsm init`` initialises the HSM (``lifecycle.hsm.provision``). SoftHSM2 reads its
slots when a process loads the module, so the card is used from a process of its own
(``card_child.py``), as it would be on the principal's workstation; this process only verifies.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from pydantic import SecretStr

from lifecycle import principals
from lifecycle.clock import utcnow
from lifecycle.config import load_settings
from lifecycle.hsm import provision
from lifecycle.identity import request
from tests.identities import Identities

ROOT_DIR = Path(__file__).resolve().parents[3]


def _card(tmp_path: Path, module: Path) -> tuple[Path, str, Path]:
    """Initialise a card token; return its SoftHSM2 configuration, label and PIN file."""
    home = tmp_path / "card-home"
    label = f"card-{secrets.token_hex(4)}"
    pin = secrets.token_urlsafe(12)
    card = load_settings(home=home, pkcs11_module=module, token_label=label,
                         so_pin=SecretStr(secrets.token_urlsafe(12)), pin=SecretStr(pin))
    assert provision.init_token(card)
    pin_file = tmp_path / "card.pin"
    provision.write_private(pin_file, pin.encode())
    return card.softhsm_conf_path, label, pin_file


def test_a_smart_card_principal_is_enrolled_and_authorized(ids: Identities,
                                                           tmp_path: Path) -> None:
    module = ids.settings.module_path
    conf, label, pin_file = _card(tmp_path, module)
    params = {"file": "a.csv", "vendor": "acme", "mapping": None, "workers": 0}
    job = {"module": str(module), "token": label, "key": "carol", "pin_file": str(pin_file),
           "action": "batch.import", "params": params, "principal": "carol",
           "installation": principals.installation_id(ids.engine), "at": utcnow().isoformat()}
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    done = subprocess.run([sys.executable, "-m", "tests.integration.identity.card_child"],
                          input=json.dumps(job), capture_output=True, text=True, env=env,
                          cwd=ROOT_DIR, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["wrong_pin"].startswith("PermanentHsmError")
    assert pin_file.read_text() not in done.stdout + done.stderr

    # Enrolled by both officers, with the card's public key (the private key never left it).
    pem = out["pem"]
    enrol = principals.enrolment_params("carol", principals.OPERATOR, pem)
    principals.enrol(ids.engine, ids.settings,
                     [ids.sign(w, "principal.enrol", enrol) for w in ("test-so", "test-so-2")],
                     "carol", principals.OPERATOR, pem, at=utcnow())
    actor = principals.authorize(ids.engine, ids.settings, request.decode(out["request"]),
                                 "batch.import", params, at=utcnow())
    assert (actor.principal, actor.role) == ("carol", principals.OPERATOR)
    assert principals.verify_all(ids.engine, ids.settings) == []
