"""The Head End System port: what meterkeys asks of a HES, and what it hears back.

    port    KeyOrder, Outcome, CertificateOrder, their JSON lines (strict), the ``Hes``
            protocol (key orders, outcomes, proofs, certificate requests and imports)
    files   FileHes: orders and certificates exported as JSON lines for a real HES,
            outcomes and certificate requests read back

A HES is outside meterkeys' trust: an order carries only wrapped keys (key_data, wrapped under
the meter's current master key) and a challenge; an outcome is believed only through the proof
APDU it carries, which meterkeys checks in the HSM (``lifecycle.meter_keys.transfer``).
"""
