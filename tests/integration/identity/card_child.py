"""A principal's workstation with a smart card, run as its own process by ``test_card.py``.

The card is a SoftHSM2 token of its own (``SOFTHSM2_CONF`` set by the parent). The process
generates a P-256 key on the card, signs one request with it through the settings
(``METERKEYS_PRINCIPAL_KEY=pkcs11:token=...;object=...`` and a PIN file) and tries a wrong PIN.
It reads its job as JSON on stdin and writes the public PEM, the encoded request and the wrong
PIN's error as JSON on stdout. Never a PIN on the command line.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from lifecycle.config import load_settings
from lifecycle.errors import MeterkeysError
from lifecycle.hsm import card
from lifecycle.identity import request, signers


def main() -> None:
    job = json.loads(sys.stdin.read())
    module, token, key = Path(job["module"]), job["token"], job["key"]
    pin_file = Path(job["pin_file"])
    card.generate_p256(module, token, key, pin_file.read_text().strip())
    settings = load_settings(principal_key=f"pkcs11:token={token};object={key}",
                             principal_key_pin_file=pin_file, principal_key_module=module)
    signer = signers.from_settings(settings)
    signed = request.make(job["action"], job["params"], job["principal"], job["installation"],
                          datetime.fromisoformat(job["at"]), signer)
    wrong = signers.Pkcs11Signer(module, token, key, "not-the-card-pin")
    try:
        wrong.sign(b"anything")
        error = "none"
    except MeterkeysError as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"pem": signer.public_key_pem(), "request": request.encode([signed]),
                      "wrong_pin": error}))


if __name__ == "__main__":
    main()
