"""DLMS/COSEM security, pure: no HSM, no database, no I/O.

    errors        DlmsError and its kinds (malformed data, a replayed counter, a refused proof)
    key_transfer  key_data of Security Setup ``global_key_transfer``: A-XDR encode, strict decode
    apdu          general-glo-ciphering APDUs (tag 0xDB), the security control byte, the GCM IV
    counter       the invocation counter rule: a counter at or below the last one seen is refused
    proof         the proof of possession: a challenge, and the checks of an answer that need no key

Why a proof is a challenge-response checked on the ciphertext (the lead's design decision):
DLMS puts the authentication key's *value* into the GCM additional authenticated data
(AAD = SC || AK, Green Book 9.2.7.2.4.1). No PKCS#11 mechanism takes a key object as AAD, so an
HSM cannot check a DLMS tag unless the AK leaves it, and meterkeys never lets a key leave. But the
GCM ciphertext does not depend on the AAD: it is AES-CTR under the encryption key (NIST SP
800-38D §7.1). So meterkeys sends a fresh random challenge; the meter answers with a
general-glo-ciphering APDU whose plaintext is that challenge, under its (new) GUEK; the HSM
GCM-encrypts the challenge under the candidate GUEK with the same IV (any AAD) and the ciphertext
parts are compared in constant time. The tag is left to the HES, which holds the AK by DLMS's own
design.
"""
