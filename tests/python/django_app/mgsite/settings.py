"""Settings of the test project: the database comes from the environment.

DATABASE_URL (postgres:// or postgresql://user:password@host:port/name) gives the connection;
DJANGO_DB_NAME, DJANGO_DB_USER, DJANGO_DB_PASSWORD, DJANGO_DB_HOST and DJANGO_DB_PORT override
its parts (or stand in for it).
"""

import os
from urllib.parse import unquote, urlsplit

SECRET_KEY = "test-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "inventory",
]


def _database() -> dict:
    url = urlsplit(os.environ.get("DATABASE_URL", ""))
    parts = {
        "NAME": unquote(url.path.lstrip("/")) if url.path else "",
        "USER": unquote(url.username or ""),
        "PASSWORD": unquote(url.password or ""),
        "HOST": url.hostname or "",
        "PORT": str(url.port or ""),
    }
    for key in parts:
        parts[key] = os.environ.get(f"DJANGO_DB_{key}", parts[key])
    return {"ENGINE": "django.db.backends.postgresql", "CONN_MAX_AGE": 0, **parts}


DATABASES = {"default": _database()}
