"""Alembic environment for the tests: the URL comes from the environment, like in a container.

Environment:
  ALEMBIC_DATABASE_URL or DATABASE_URL   postgres:// or postgresql:// URL (made postgresql+psycopg2://)
  ALEMBIC_TRANSACTION_PER_MIGRATION      "1" (default): each revision commits on its own, as many
                                         projects run it; "0": one transaction for the whole upgrade
  MG_TOOL_RUN_LOG                        if set, a file that gets one line per run of this tool
"""

import os
import sys
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)


def database_url() -> str:
    url = os.environ.get("ALEMBIC_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("alembic env.py: set DATABASE_URL")
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def log_run() -> None:
    path = os.environ.get("MG_TOOL_RUN_LOG")
    if path:
        line = f"alembic pid={os.getpid()} argv={' '.join(sys.argv[1:])}\n"
        # One short O_APPEND write per run: lines from concurrent runs do not interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


per_migration = os.environ.get("ALEMBIC_TRANSACTION_PER_MIGRATION", "1") != "0"


def run_migrations_offline() -> None:
    context.configure(url=database_url(), literal_binds=True, transaction_per_migration=per_migration)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=per_migration)
        with context.begin_transaction():
            context.run_migrations()


log_run()
if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
