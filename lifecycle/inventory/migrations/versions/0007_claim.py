"""ownership claim: key orders, invocation counters per key version, one pending version per
key, the end of the manufacturer's access

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('claim_order',
    sa.Column('order_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('meter_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('key_data', sa.LargeBinary(), nullable=False),
    sa.Column('challenge', sa.LargeBinary(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('hes_status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('verdict', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('settled_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['meter_id'], ['meter.id'], ),
    sa.PrimaryKeyConstraint('order_id')
    )
    with op.batch_alter_table('claim_order', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_claim_order_meter_id'), ['meter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_claim_order_status'), ['status'], unique=False)

    op.create_table('invocation_counter',
    sa.Column('key_version_id', sa.Integer(), nullable=False),
    sa.Column('last_ic', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['key_version_id'], ['key_version.id'], ),
    sa.PrimaryKeyConstraint('key_version_id')
    )
    with op.batch_alter_table('meter', schema=None) as batch_op:
        batch_op.add_column(sa.Column('manufacturer_access_ended_at',
                                      sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    # Never two pending versions of one key: a partial unique index, on both databases.
    op.create_index('uq_key_version_one_pending', 'key_version', ['meter_id', 'key_id'],
                    unique=True, sqlite_where=sa.text("state = 'pending'"),
                    postgresql_where=sa.text("state = 'pending'"))


def downgrade() -> None:
    op.drop_index('uq_key_version_one_pending', table_name='key_version')
    with op.batch_alter_table('meter', schema=None) as batch_op:
        batch_op.drop_column('manufacturer_access_ended_at')
    op.drop_table('invocation_counter')
    with op.batch_alter_table('claim_order', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_claim_order_status'))
        batch_op.drop_index(batch_op.f('ix_claim_order_meter_id'))
    op.drop_table('claim_order')
