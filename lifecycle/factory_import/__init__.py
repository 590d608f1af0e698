"""Process 1, factory batch import: a manufacturer's delivery verified, its meters' keys
re-wrapped from the batch transport key to the storage KEK inside the HSM, bad rows quarantined.

    batch_format  pure: the canonical delivery (manifest, fields, signature, checksum)
    reader        vendor files (CSV, JSON Lines, XML, XLSX) -> checked chunks; the only pandas user
    vendor        the vendors' RSA import keys in the HSM
    rewrap        the HSM job that re-wraps a chunk's keys (runs on the HSM workers)
    rules         pure: which rows are registered, skipped or quarantined
    steps         verify a delivery, store chunks, finish; the process's HSM, inventory and audit
"""
