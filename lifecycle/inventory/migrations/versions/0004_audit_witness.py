"""audit witness: the installation's identity (a random UUID made here, once)

Revision ID: 0004
Revises: 0003
"""
import uuid
from datetime import UTC, datetime

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table('installation',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    # Made once, with the schema: it never depends on a transaction that might roll back, so
    # the witness's header and the inventory always name the same installation.
    op.bulk_insert(table, [{'id': str(uuid.uuid4()), 'created_at': datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table('installation')
