"""A slow revision (like a big backfill or index build): sleeps, then adds an index.

Revision ID: 0002_slow
Revises: 0001_tables

ALEMBIC_SLOW_SECONDS sets the sleep (default 1.5).
"""

import os
import time

from alembic import op

revision = "0002_slow"
down_revision = "0001_tables"
branch_labels = None
depends_on = None


def upgrade() -> None:
    time.sleep(float(os.environ.get("ALEMBIC_SLOW_SECONDS", "1.5")))
    op.create_index("widgets_name_idx", "widgets", ["name"])


def downgrade() -> None:
    op.drop_index("widgets_name_idx", table_name="widgets")
