"""Release R2's revision: a new column and a second seed row (plain INSERT again).

Revision ID: 0004_color
Revises: 0003_seed
"""

import os
import time

from alembic import op
import sqlalchemy as sa

revision = "0004_color"
down_revision = "0003_seed"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("widgets", sa.Column("color", sa.Text, nullable=True))
    time.sleep(float(os.environ.get("ALEMBIC_SLOW_SECONDS", "1.5")) / 3)
    op.execute("INSERT INTO widgets (name, color) VALUES ('r2-seed', 'blue')")


def downgrade() -> None:
    op.execute("DELETE FROM widgets WHERE name = 'r2-seed'")
    op.drop_column("widgets", "color")
