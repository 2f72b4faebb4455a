"""The feature pages' fast lane: the two reads a dashboard makes most, a latent list and a
latent page, served without the framework's routing, parameter solving and middleware
stack. Under load those cost the server as much CPU as building the page itself
(``benchmarks/api_load.py``; a profile of the server showed half its time there).

``FastLane`` is the app's outermost middleware. It serves a request here when all of
this holds, and otherwise hands it on, untouched, to the app:

- ``GET /api/v1/saes/{sae}/latents`` or ``GET /api/v1/saes/{sae}/latents/{index}``;
- every parameter it knows is in the plain form FastAPI reads the same way (digits,
  ``0.25``, one of the allowed words) and within the route's limits; each given once;
  the list's text query and explanation filter are left to the app;
- no cookie (a browser's session, which the app's middleware reads and refreshes) and
  reads are public (``require_key_for_reads`` off).

A page is then made by the same service call as the route's (``services.features``), in
the same page thread under the same database slot (``deps.page_bytes``), and sent with the
same headers. The service's own errors (an unknown SAE or latent: 404; the database
down: 503) are rendered as the app renders them; anything else goes to the app, which
renders it. So the routes in ``api.routes.latents`` stay the one definition of the API,
with its OpenAPI schema and its answers to every malformed request; tests check that
both give the same bytes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from ..db.errors import DatabaseUnavailable
from ..services import features
from ..services.errors import KronScopeError
from .deps import page_bytes
from .errors import RETRY_AFTER_SECONDS, error_response

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/api/v1/saes/([^/]{1,128})/latents(?:/(-?[0-9]{1,18}))?$")
_DIGITS = re.compile(r"^[0-9]{1,10}$")
_DECIMAL = re.compile(r"^[0-9]{1,10}(?:\.[0-9]{1,20})?$")
INT32_MAX = 2**31 - 1


class _Refer(Exception):
    """Leave this request to the app."""


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not _DIGITS.match(raw) or not lo <= int(raw) <= hi:
            raise _Refer
        return int(raw)

    return parse


def _density(raw: str) -> float:
    if not _DECIMAL.match(raw) or not 0.0 <= float(raw) <= 1.0:
        raise _Refer
    return float(raw)


def _word(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise _Refer
        return raw

    return parse


_LIST = {
    "sort": _word("index", "density", "max_activation"),
    "order": _word("asc", "desc"),
    "min_density": _density,
    "max_density": _density,
    "head": _int(0, INT32_MAX),
    "limit": _int(1, 500),
    "offset": _int(0, INT32_MAX),
}
_LIST_REFERRED = ("q", "has_explanation")
_LATENT = {
    "top_k": _int(0, 100),
    "intervals": _int(0, 20),
    "mode": _word("width", "quantile"),
    "per_interval": _int(1, 50),
}


def _params(query_string: bytes, known: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    # As Starlette reads a query string.
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    out: dict[str, Any] = {}
    for name, raw in pairs:
        if name in _LIST_REFERRED and known is _LIST:
            raise _Refer
        parse = known.get(name)
        if parse is None:
            continue  # the route ignores parameters it does not know
        if name in out:
            raise _Refer
        out[name] = parse(raw)
    return out


def _read(scope: Scope) -> Callable[[Any], Any] | None:
    """What the request asks of ``services.features``, or None to leave it to the app."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    match = _PATH.match(scope["path"])
    if match is None:
        return None
    for name, _ in scope["headers"]:
        if name == b"cookie":
            return None
    slug, index = match.group(1), match.group(2)
    try:
        if index is None:
            params = _params(scope["query_string"], _LIST)
            return lambda reader: features.list_latents(reader, slug, **params)
        params = _params(scope["query_string"], _LATENT)
    except _Refer:
        return None
    number = int(index)
    return lambda reader: features.latent_detail(reader, slug, number, **params)


class FastLane:
    """ASGI middleware: serve the hot feature-page reads (see the module docstring)."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        read = None if self.state.settings.require_key_for_reads else _read(scope)
        if read is None:
            await self.app(scope, receive, send)
            return
        try:
            content = await page_bytes(self.state, read, None)
        except KronScopeError as exc:
            response = error_response(
                exc.status_code, exc.code, exc.message, exc.detail, exc.headers
            )
            await response(scope, receive, send)
            return
        except DatabaseUnavailable as exc:
            log.warning("database unavailable: %s", exc)
            response = error_response(
                503,
                "database_unavailable",
                "The database cannot be reached right now; try again in a few seconds.",
                None,
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
            await response(scope, receive, send)
            return
        except Exception:
            await self.app(scope, receive, send)  # the app renders (and logs) it
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(content)).encode("ascii")),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})
