"""Insert the seed row. A plain INSERT: running this revision twice would duplicate it.

Revision ID: 0003_seed
Revises: 0002_slow

The last revision of release R1 in the rolling-upgrade test.
"""

from alembic import op

revision = "0003_seed"
down_revision = "0002_slow"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO widgets (name) VALUES ('seed')")


def downgrade() -> None:
    op.execute("DELETE FROM widgets WHERE name = 'seed'")
