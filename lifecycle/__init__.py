"""meterkeys lifecycle core: the key lifecycle of smart-meter credentials, HSM-backed.

Foundations (never import a process):
    errors, config, policy, clock   one error tree, settings, suites and periods, the clock
    hsm/         the only pkcs11 user
    inventory/   the only SQL user
    audit/       the hash-chained, HSM-signed audit trail
    principals   roles and permissions

Processes (one package each, never importing another):
    installation/     the token, its long-lived keys, backup and restore
    factory_import/   process 1: a manufacturer's delivery taken into custody

This package never imports prefect, typer or rich, nor the flows, tasks, CLI or simulator.
"""
