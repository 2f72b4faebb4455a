"""Errors raised by the database layer. Each carries the HTTP status the API should use."""

from __future__ import annotations


class DatabaseError(Exception):
    """Base class of the database layer's domain errors."""

    status_code = 500
    code = "database_error"


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (server down, wrong host, unreadable file)."""

    status_code = 503
    code = "database_unavailable"


class NotFound(DatabaseError):
    status_code = 404
    code = "not_found"


class Conflict(DatabaseError):
    """A unique value is already taken (slug, checkpoint hash) or a state change is refused."""

    status_code = 409
    code = "conflict"

    def __init__(self, message: str, *, existing_id: int | str | None = None):
        super().__init__(message)
        self.existing_id = existing_id
