"""The DSO's PKI: an offline root, online sub-CAs in the HSM, device certificates, CRLs, and
the manufacturers' factory CAs that meters arrive with.

    root token (offline: the ceremony's child only)      main token (online processes)
    ┌──────────────────────────┐                         ┌──────────────────────────────────┐
    │ root CA key  P-384       │── signs at ceremony ──▶ │ device-p256  (suite 1 meters)    │
    │  self-signed root cert   │                         │ device-p384  (suite 2 meters)    │
    │  root CRL                │                         │ maintenance  (temporary access)  │
    └──────────────────────────┘                         │ firmware signer (leaf of root)   │
                                                         └──────────────┬───────────────────┘
                                                                        │ signs in bulk
                                            device certificates (signature / key agreement),
                                            one CRL per CA key

    profiles   what each certificate and CRL holds (pure; DLMS Green Book §9.2.6, RFC 5280)
    signing    TBS built with cryptography, signed in the HSM (CKM_ECDSA), assembled, verified
    issuing    device certificates in bulk: an HSM job on plain data (no key crosses)
    rules      what a ceremony makes or renews; CRL numbers (pure)
    root       the root token's jobs, run in the ceremony's child process only
    ceremony   root, sub-CAs and the root's CRL, under two security officers' signatures
    steps      issue and record, revoke, CRLs, export
    trust      a meter's factory certificate against its vendor's factory CAs (pure)

CA keys are made in the HSM (``lifecycle.hsm.templates.CA_KEY``: sign-only with CKM_ECDSA,
sensitive, never extractable, not modifiable, copyable or destroyable) and never leave it; the
online ones are pinned in the inventory and checked before every use, the root's by its
certificate.
"""
