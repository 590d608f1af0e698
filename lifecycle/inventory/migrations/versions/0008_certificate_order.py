"""ownership claim: certificate orders (operational certificates until the HES delivered them)

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('certificate_order',
    sa.Column('order_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('meter_id', sa.Integer(), nullable=False),
    sa.Column('signature_serial', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('key_agreement_serial', sqlmodel.sql.sqltypes.AutoString(length=64),
              nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('delivered_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['meter_id'], ['meter.id'], ),
    sa.PrimaryKeyConstraint('order_id')
    )
    with op.batch_alter_table('certificate_order', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_certificate_order_meter_id'), ['meter_id'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_certificate_order_status'), ['status'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('certificate_order', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_certificate_order_status'))
        batch_op.drop_index(batch_op.f('ix_certificate_order_meter_id'))
    op.drop_table('certificate_order')
