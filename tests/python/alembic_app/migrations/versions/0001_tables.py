"""Create the tables.

Revision ID: 0001_tables
Revises:
"""

from alembic import op
import sqlalchemy as sa

revision = "0001_tables"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "widgets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "widget_parts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("widget_id", sa.Integer, sa.ForeignKey("widgets.id"), nullable=False),
        sa.Column("part", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("widget_parts")
    op.drop_table("widgets")
