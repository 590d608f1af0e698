"""principal keys: public keys and signed enrolments, used request nonces, pending requests

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('principal', schema=None) as batch_op:
        batch_op.add_column(sa.Column('public_pem', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('enrolment', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('disabled_by', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_principal_fingerprint'), ['fingerprint'], unique=True)
    op.create_table('request_nonce',
    sa.Column('nonce', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('principal', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('used_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('nonce')
    )
    op.create_table('pending_request',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('params', sa.Text(), nullable=False),
    sa.Column('requests', sa.Text(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('pending_request')
    op.drop_table('request_nonce')
    with op.batch_alter_table('principal', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_principal_fingerprint'))
        batch_op.drop_column('disabled_by')
        batch_op.drop_column('enrolment')
        batch_op.drop_column('fingerprint')
        batch_op.drop_column('public_pem')
