"""the DSO's PKI: CA certificates, issued certificates, CRLs; vendors' factory CAs

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ca_certificate',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ca_name', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('curve', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('serial', sa.String(length=64), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('not_before', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('not_after', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=False),
    sa.Column('key_label', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('key_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ca_name', 'generation'),
    sa.UniqueConstraint('serial')
    )
    op.create_index(op.f('ix_ca_certificate_ca_name'), 'ca_certificate', ['ca_name'], unique=False)
    op.create_table('crl',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ca_name', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('this_update', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('next_update', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ca_name', 'generation', 'number')
    )
    op.create_table('issued_certificate',
    sa.Column('serial', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('ca_name', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('ca_generation', sa.Integer(), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('meter_serial', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('usage', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('not_before', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('not_after', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=False),
    sa.Column('revoked_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('revocation_reason', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.PrimaryKeyConstraint('serial')
    )
    op.create_index(op.f('ix_issued_certificate_meter_serial'), 'issued_certificate', ['meter_serial'], unique=False)
    op.create_index(op.f('ix_issued_certificate_subject'), 'issued_certificate', ['subject'], unique=False)
    op.create_table('vendor_ca',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('vendor_id', sa.Integer(), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('curve', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('not_before', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('not_after', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=False),
    sa.Column('added_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['vendor_id'], ['vendor.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('fingerprint')
    )
    op.create_index(op.f('ix_vendor_ca_vendor_id'), 'vendor_ca', ['vendor_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_vendor_ca_vendor_id'), table_name='vendor_ca')
    op.drop_table('vendor_ca')
    op.drop_index(op.f('ix_issued_certificate_subject'), table_name='issued_certificate')
    op.drop_index(op.f('ix_issued_certificate_meter_serial'), table_name='issued_certificate')
    op.drop_table('issued_certificate')
    op.drop_table('crl')
    op.drop_index(op.f('ix_ca_certificate_ca_name'), table_name='ca_certificate')
    op.drop_table('ca_certificate')
