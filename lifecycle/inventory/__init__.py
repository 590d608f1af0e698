"""The inventory: the only package that speaks SQL.

    db            engine, transactions, snapshots, Alembic migrations, bulk insert
    vendors       manufacturers, manifest signing keys, mappings, import key labels
    batches       deliveries and their quarantined rows
    meters        meters and their key versions (key blobs wrapped under the storage KEK)
    principals    who may act, with which role, under which key, enrolled by whom
    requests      signed requests' used nonces, and dual-control requests pending
    audit_events  the audit trail's events, head and signed checkpoints
    kek_checks    a canary blob per storage KEK
    hsm_keys      pins of the HSM's long-lived keys (CKA_ID and check value per role)
    installations the installation's id (signed into audit checkpoints, kept by the witness)
    backups       token backup generations
    certificates  the DSO's PKI: CA certificates, issued certificates, CRLs (DER)
    vendor_cas    manufacturers' factory CA certificates
    claims        the ownership claim: key orders sent to the HES, invocation counters,
                  certificate orders
    migrations/   Alembic revisions

No column holds key material in clear, a PIN or a transport key. Every table module is imported
here, so that the metadata (and Alembic) always sees the whole schema.
"""

from lifecycle.inventory import (  # noqa: F401 - registers every table in the metadata
    audit_events,
    backups,
    batches,
    certificates,
    claims,
    hsm_keys,
    installations,
    kek_checks,
    meters,
    principals,
    requests,
    vendor_cas,
    vendors,
)
