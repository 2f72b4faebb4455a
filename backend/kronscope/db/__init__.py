"""Database layer: models, engine/sessions, migrations and repositories (all SQL lives here)."""

from .engine import (
    check_connection,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_sessionmaker,
    upgrade,
)
from .errors import Conflict, DatabaseError, DatabaseUnavailable, NotFound

__all__ = [
    "Conflict",
    "DatabaseError",
    "DatabaseUnavailable",
    "NotFound",
    "check_connection",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "upgrade",
]
