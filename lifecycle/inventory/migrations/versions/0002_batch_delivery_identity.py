"""A delivery is its data file and its manifest: add import_batch.manifest_sha256.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("import_batch") as batch_op:
        batch_op.add_column(sa.Column("manifest_sha256", sa.String(length=64), nullable=False,
                                      server_default=""))
        batch_op.drop_constraint("uq_import_batch_file", type_="unique")
        batch_op.create_unique_constraint("uq_import_batch_delivery",
                                          ["vendor_id", "file_sha256", "manifest_sha256"])


def downgrade() -> None:
    with op.batch_alter_table("import_batch") as batch_op:
        batch_op.drop_constraint("uq_import_batch_delivery", type_="unique")
        batch_op.create_unique_constraint("uq_import_batch_file", ["vendor_id", "file_sha256"])
        batch_op.drop_column("manifest_sha256")
