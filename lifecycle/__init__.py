"""meterkeys lifecycle core: key lifecycle of smart-meter credentials, HSM-backed.

This package never imports prefect. Inside it, only the HSM modules import pkcs11, only the
inventory speaks SQL and only the importer uses pandas.
"""
