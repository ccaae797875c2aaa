"""A stand-in app for tests/python_tools.rs: records that it started, with the value of
ENABLE_DB_MIGRATIONS and the Alembic revision it sees, into py_app_starts (made by the test),
then exits 0."""

import os

import psycopg2

conn = psycopg2.connect(os.environ["DATABASE_URL"])
with conn, conn.cursor() as cur:
    cur.execute("SELECT to_regclass('alembic_version') IS NOT NULL")
    version = None
    if cur.fetchone()[0]:
        cur.execute("SELECT string_agg(version_num, ',') FROM alembic_version")
        version = cur.fetchone()[0]
    cur.execute(
        "INSERT INTO py_app_starts (pid, flag, alembic_version) VALUES (%s, %s, %s)",
        (os.getpid(), os.environ.get("ENABLE_DB_MIGRATIONS"), version),
    )
conn.close()
