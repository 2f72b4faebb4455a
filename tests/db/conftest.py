"""Database fixtures for tests/db (defined in tests/helpers/db.py, to be shared later)."""

from helpers.db import *  # noqa: F403
