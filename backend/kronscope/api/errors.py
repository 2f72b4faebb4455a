"""One error shape everywhere: ``{"error": {"code", "message", "detail"}}``.

``add_exception_handlers(app)`` renders domain errors (which carry their status), unknown
routes and methods, validation errors (in plain words), database outages (503 with
Retry-After) and anything unexpected (500, logged) in that shape. Paths outside ``/api``
may be rendered by a page renderer the web layer passes in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..db.errors import DatabaseError, DatabaseUnavailable
from ..services.errors import KronScopeError

log = logging.getLogger(__name__)

PageRenderer = Callable[[Request, int, str, str], Response]
"""(request, status, code, message) -> an HTML response, for paths outside ``/api``."""

RETRY_AFTER_SECONDS = 5

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    503: "unavailable",
}


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. not_found.")
    message: str = Field(description="What went wrong, in plain words.")
    detail: dict[str, Any] = Field(default_factory=dict, description="Extra facts, if any.")


class ErrorResponse(BaseModel):
    """Every error response has this shape."""

    error: ErrorBody


def error_response(
    status: int,
    code: str,
    message: str,
    detail: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "detail": detail or {}}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- validation errors in plain words ------------------------------------------------------
_WHERE = {
    "query": "query parameter",
    "path": "path parameter",
    "header": "header",
    "cookie": "cookie",
}


def _reason(err: dict[str, Any]) -> str:
    kind, ctx = err.get("type"), err.get("ctx") or {}
    simple = {
        "missing": "is required",
        "int_parsing": "must be a whole number",
        "int_type": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "finite_number": "must be a finite number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be text",
        "extra_forbidden": "is not a known field",
        "model_attributes_type": "must be a JSON object",
        "dict_type": "must be a JSON object",
    }
    if kind in simple:
        return simple[kind]
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": ("at least", "ge"),
            "greater_than": ("greater than", "gt"),
            "less_than_equal": ("at most", "le"),
            "less_than": ("less than", "lt"),
        }[kind]
        return f"must be {words[0]} {ctx.get(words[1])}"
    if kind == "string_too_long":
        return f"must have at most {ctx.get('max_length')} characters"
    if kind in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "string_too_short":
        return f"must have at least {ctx.get('min_length')} characters"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    msg = str(err.get("msg", "is not valid")).removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _plain(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    msg = _reason(err)
    given = err.get("input")
    if (
        isinstance(given, str | int | float)
        and not isinstance(given, bool)
        and err.get("type") != "missing"
    ):
        shown = repr(given) if len(repr(given)) <= 40 else repr(given)[:37] + "..."
        msg += f" (got {shown})"
    if not loc:
        return msg
    if loc[0] == "body":
        field = ".".join(loc[1:])
        return f"body field '{field}': {msg}" if field else f"request body: {msg}"
    where = _WHERE.get(loc[0], loc[0])
    name = ".".join(loc[1:])
    return f"{where} '{name}': {msg}"


def _validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append(
            {"loc": [str(p) for p in e.get("loc", ())], "message": _plain(e), "type": e.get("type")}
        )
    return out


def validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (e.get("ctx") or {}).get("error", "not valid JSON")
        pos = e.get("loc", ("body", None))[-1]
        return error_response(
            400,
            "malformed_json",
            f"The request body is not valid JSON ({reason} at character {pos}).",
            {"position": pos},
        )
    items = _validation_detail(errors)
    message = "; ".join(i["message"] for i in items[:3])
    if len(items) > 3:
        message += f"; and {len(items) - 3} more"
    return error_response(
        422, "validation_error", message[:1].upper() + message[1:] + ".", {"errors": items}
    )


# -- handlers --------------------------------------------------------------------------------
def add_exception_handlers(app: FastAPI, page_renderer: PageRenderer | None = None) -> None:
    def render(
        request: Request,
        status: int,
        code: str,
        message: str,
        detail: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        if page_renderer is not None and not request.url.path.startswith("/api"):
            response = page_renderer(request, status, code, message)
            for k, v in (headers or {}).items():
                response.headers[k] = v
            return response
        return error_response(status, code, message, detail, headers)

    async def domain(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, KronScopeError)
        return render(request, exc.status_code, exc.code, exc.message, exc.detail, exc.headers)

    async def http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        code = _CODES.get(status, "error")
        if status == 404:
            message = f"There is nothing at {request.url.path}."
        elif status == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        elif isinstance(exc.detail, str) and exc.detail:
            message = exc.detail
        else:
            message = HTTPStatus(status).phrase
        return render(request, status, code, message, None, dict(exc.headers or {}))

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        response = validation_response(exc)
        if page_renderer is not None and not request.url.path.startswith("/api"):
            import json

            body = json.loads(bytes(response.body))["error"]
            return page_renderer(request, response.status_code, body["code"], body["message"])
        return response

    async def database_down(request: Request, exc: Exception) -> Response:
        log.warning("database unavailable: %s", exc)
        return render(
            request,
            503,
            "database_unavailable",
            "The database cannot be reached right now; try again in a few seconds.",
            None,
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    async def database_domain(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DatabaseError)
        if isinstance(exc, DatabaseUnavailable):
            return await database_down(request, exc)
        detail: dict[str, Any] = {}
        existing = getattr(exc, "existing_id", None)
        if existing is not None:
            detail["existing_id"] = existing
        message = str(exc) or HTTPStatus(exc.status_code).phrase
        message = message[:1].upper() + message[1:]
        if not message.endswith("."):
            message += "."
        return render(request, exc.status_code, exc.code, message, detail)

    async def integrity(request: Request, exc: Exception) -> Response:
        log.info("integrity error: %s", exc)
        return render(
            request, 409, "conflict", "The request conflicts with data that already exists."
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return render(
            request,
            500,
            "internal_error",
            "Something went wrong on the server; it has been logged.",
        )

    app.add_exception_handler(KronScopeError, domain)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(RequestValidationError, validation)
    for exc_type in DATABASE_DOWN:
        app.add_exception_handler(exc_type, database_down)
    app.add_exception_handler(DatabaseError, database_domain)
    app.add_exception_handler(sa_exc.IntegrityError, integrity)
    app.add_exception_handler(Exception, unexpected)


DATABASE_DOWN: tuple[type[Exception], ...] = (
    DatabaseUnavailable,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
)
"""Errors meaning the database cannot be reached (or is locked), not that a query was wrong."""


def is_database_down(exc: BaseException) -> bool:
    return isinstance(exc, DATABASE_DOWN)
