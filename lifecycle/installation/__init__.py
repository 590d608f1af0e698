"""The installation: set up the HSM token and its long-lived keys, report on them, back them up
and restore them, and sign or verify the audit trail with the HSM's audit key.

    steps   each administrative operation, over the HSM, the inventory and the audit trail
"""
