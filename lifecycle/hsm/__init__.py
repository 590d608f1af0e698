"""The HSM: the only package that imports pkcs11.

    boundary        one lock for every PKCS#11 call of a process; PKCS#11 errors translated
    session         HsmSession: long-lived keys checked and pinned, wrap/unwrap, MAC, sign, GCM
    dlms_ops        DLMS: new meter keys wrapped for storage and the meter; the proof check
    native          the ctypes path for nested templates (C_GenerateKey[Pair], attribute reads)
    templates       key profiles and the policy every long-lived key is checked against
    keyring         lookup by label and pinned CKA_ID, policy check, check values, pins trusted
    check           the protection probe, mechanisms, pin verification (meterkeys hsm check)
    connection      Hsm: the module loaded and logged in once per process, a pool of sessions
    pool            HsmWorkers: spawned processes running any module-level job, one login each
    provision       SoftHSM2 configuration, token initialisation, PIN files, long-lived keys
    token_lock      the token directory lock (shared while open, exclusive for backup/restore)
    softhsm_backup  backup and restore of the embedded SoftHSM2 token

It hands out key references (labels, session handles) and public bytes, never key material, and
knows nothing of the inventory: what it must check against stored data is passed in.
"""
