"""Process: the ownership claim. The DSO's keys replace the manufacturer's on registered meters.

    rules    pure: which meters, which key versions, what an answer proves (the protocol)
    errors   ClaimError
    steps    select, prepare (factory trust, HSM jobs), submit, settle (proofs in the HSM),
             recover
    certificate_request   pure: a meter's PKCS#10 request checked before it is certified
    certification         operational certificates: requests, device CA in the HSM, delivery
"""
