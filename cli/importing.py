"""meterkeys import, demo and serve commands."""

import typer


def register(app: typer.Typer) -> None:
    """Add the top-level commands."""
