"""The meterkeys command line (typer + rich): commands over the process steps and flows.

Prefect reads its settings when it is first imported, so this package points Prefect at the
meterkeys home before any command module imports it.
"""

from cli import prefect_env

prefect_env.configure()
