"""claim orders: an index on (meter_id, status), so superseding a chunk's pending orders reads
only those meters' orders (SQLite otherwise takes the status index and reads every pending
order of the inventory, once per slice of meters)

Revision ID: 0010
Revises: 0009
"""
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_claim_order_meter_status', 'claim_order', ['meter_id', 'status'])


def downgrade() -> None:
    op.drop_index('ix_claim_order_meter_status', table_name='claim_order')
