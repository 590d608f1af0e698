"""A meter's keys in custody: key blobs bound to what they belong to, checked before use.

    binding   pure: the message a blob's MAC covers (meter, key id, version, KEK, blob)
    custody   over the HSM and the inventory: verify every blob in bulk, open one for use
    transfer  HSM jobs of a key transfer: new pending keys bound and in key_data; proof checks
"""
