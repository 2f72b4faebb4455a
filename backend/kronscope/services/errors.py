"""Domain errors that carry their HTTP status, so services stay free of web imports and the
API renders every one of them the same way (``kronscope.api.errors``).

Messages are plain words a person can act on; ``detail`` holds machine-readable extras.
"""

from __future__ import annotations

from typing import Any


class KronScopeError(Exception):
    """Base class: a request cannot be served as asked."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        detail: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.detail = detail or {}
        self.headers = headers or {}


class BadRequest(KronScopeError):
    status_code = 400
    code = "bad_request"


class Unauthorized(KronScopeError):
    status_code = 401
    code = "unauthorized"


class Forbidden(KronScopeError):
    status_code = 403
    code = "forbidden"


class NotFound(KronScopeError):
    status_code = 404
    code = "not_found"


class Conflict(KronScopeError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(KronScopeError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(KronScopeError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(KronScopeError):
    """The request is well formed but its content is wrong (a bad checkpoint, a bad value)."""

    status_code = 422
    code = "invalid"


class ServiceUnavailable(KronScopeError):
    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, detail: dict[str, Any] | None = None):
        super().__init__(message, detail=detail, headers={"Retry-After": str(retry_after)})
