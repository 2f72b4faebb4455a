"""What every router shares: the checked route class and the documented error responses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..errors import ErrorResponse
from ..routing import APIRouteChecked

_ERROR_STATUSES = {
    400: "Malformed request (e.g. invalid JSON).",
    401: "A valid API key is needed.",
    403: "The API key lacks the scope needed.",
    404: "Not found.",
    409: "Conflicts with existing data.",
    413: "The body is too large.",
    415: "Wrong content type.",
    422: "A value is not valid.",
    503: "The database cannot be reached; retry after Retry-After seconds.",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in _ERROR_STATUSES.items()
}


def make_router(tag: str) -> APIRouter:
    return APIRouter(tags=[tag], route_class=APIRouteChecked, responses=ERROR_RESPONSES)
