"""Alembic environment: runs against the connection handed in by ``inventory.migrate``."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import lifecycle.inventory  # noqa: F401  (registers every table)

target_metadata = SQLModel.metadata
connection = context.config.attributes.get("connection")
if connection is None:
    from sqlalchemy import create_engine

    url = context.config.get_main_option("sqlalchemy.url") or "sqlite:///var/inventory.db"
    connection = create_engine(url).connect()

context.configure(connection=connection, target_metadata=target_metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
