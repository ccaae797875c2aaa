#!/usr/bin/env python
"""Django's command-line utility for the test project (`python manage.py migrate`)."""

import os
import sys


def log_run() -> None:
    path = os.environ.get("MG_TOOL_RUN_LOG")
    if path:
        line = f"django pid={os.getpid()} argv={' '.join(sys.argv[1:])}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mgsite.settings")
    log_run()
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
