#!/usr/bin/env python3
"""The sandbox's small Django app: ``python3 manage.py migrate --noinput`` and friends."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fabapp.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
