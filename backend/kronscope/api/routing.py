"""The route class every API router uses: checks the request's content type and size before
FastAPI reads the body, so a wrong content type is a 415 and an oversized body a 413 in our
error shape, never a confusing validation error."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header

from ..services.errors import PayloadTooLarge, UnsupportedMediaType

JSON_TYPES = (b"application/json",)


def _is_json(content_type: bytes) -> bool:
    return content_type in JSON_TYPES or (
        content_type.startswith(b"application/") and content_type.endswith(b"+json")
    )


class APIRouteChecked(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        expects_json = self.body_field is not None

        async def checked(request: Request) -> Response:
            if expects_json and request.method in ("POST", "PUT", "PATCH"):
                raw = request.headers.get("content-type")
                length = request.headers.get("content-length")
                has_body = raw is not None or (length is not None and length != "0")
                if has_body:
                    ctype, _ = parse_options_header(raw or "")
                    if not _is_json(ctype):
                        raise UnsupportedMediaType(
                            f"This endpoint takes a JSON body (Content-Type: application/json), not {raw or 'an untyped body'}.",
                        )
                limit = getattr(request.app.state, "settings", None)
                max_bytes = limit.max_json_bytes if limit is not None else 1024**2
                if length and length.isdigit() and int(length) > max_bytes:
                    raise PayloadTooLarge(
                        f"The request body is larger than the limit of {max_bytes:,} bytes.",
                        detail={"limit_bytes": max_bytes},
                    )
            return await handler(request)

        return checked
