"""key hygiene: HSM key pins, blob MACs, wrapped-key digests, backup generations

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hsm_key',
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('label', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('key_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('check_value', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('role')
    )
    op.create_table('token_backup',
    sa.Column('generation', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('path', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('manifest_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.PrimaryKeyConstraint('generation')
    )
    with op.batch_alter_table('key_version', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mac', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('source_digest', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_key_version_source_digest'), ['source_digest'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('key_version', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_key_version_source_digest'))
        batch_op.drop_column('source_digest')
        batch_op.drop_column('mac')
    op.drop_table('token_backup')
    op.drop_table('hsm_key')
