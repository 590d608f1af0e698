"""The tamper-evident audit trail.

    chain   pure: canonical details, event hashes, checkpoint digests, chain verification
    trail   over the inventory and an HSM signer: record, checkpoint, verify, list
    witness where signed heads go besides the inventory: an append-only file, syslog
"""
