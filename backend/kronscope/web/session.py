"""The browser's API key and CSRF protection.

- **Where the key lives.** A person enters an API key once (``/key``); it is kept in the
  session cookie, which Starlette's ``SessionMiddleware`` signs (itsdangerous, with a key
  derived from ``settings.secret_key``) and marks httpOnly, so page scripts never see it.
  The cookie is signed, not encrypted: it holds the person's own key, on their own
  browser.
- **How writes get it.** The pages' scripts call the real JSON API (``/api/v1/...``) on the
  same origin. ``CookieKeyMiddleware`` adds the session's key as ``X-API-Key`` to those
  requests when they carry no credentials of their own, so the API checks scopes exactly
  as for any other client.
- **CSRF.** A synchronizer token is kept in the session and put in every page
  (``<meta name="csrf-token">`` and hidden form fields). A state-changing request that
  would be authenticated by the cookie must echo it (``X-CSRF-Token`` header from
  scripts, ``csrf_token`` field from forms), and must not come from another origin;
  otherwise it is refused with 403 before it reaches the API. Requests with their own
  ``Authorization`` / ``X-API-Key`` header are not cookie-authenticated and pass as they
  are (a cross-site page cannot set those headers).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings

SESSION_COOKIE = "kronscope_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

_CSRF = "csrf"
_KEY = "api_key"
_KEY_NAME = "key_name"
_KEY_SCOPES = "key_scopes"
_FLASH = "flash"


def session_secret(settings: Settings) -> str:
    """The cookie signing key: derived from the settings secret, never the secret itself."""
    secret = settings.resolved_secret_key.encode("utf-8")
    return hmac.new(secret, b"kronscope-session-cookie", hashlib.sha256).hexdigest()


def _session(request: Request) -> dict[str, Any]:
    # Error pages may render for requests the session middleware never saw.
    session = request.scope.get("session")
    return session if isinstance(session, dict) else {}


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    session = _session(request)
    token = session.get(_CSRF)
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        if "session" in request.scope:
            session[_CSRF] = token
    return token


def csrf_ok(session: dict[str, Any], sent: str | None) -> bool:
    expected = session.get(_CSRF)
    if not isinstance(expected, str) or not expected or not sent:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), sent.encode("utf-8"))


def same_origin(headers: Headers) -> bool:
    """False only when the browser says the request comes from another origin."""
    origin = headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    host = headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower()


# -- the stored key -----------------------------------------------------------------------------
def stored_key(request: Request) -> str | None:
    key = _session(request).get(_KEY)
    return key if isinstance(key, str) and key else None


def key_identity(request: Request) -> tuple[str, list[str]] | None:
    """``(name, scopes)`` of the stored key as last checked (no database access)."""
    session = _session(request)
    if not stored_key(request):
        return None
    scopes = session.get(_KEY_SCOPES)
    return str(session.get(_KEY_NAME, "")), list(scopes) if isinstance(scopes, list) else []


def store_key(request: Request, plain: str, name: str, scopes: list[str]) -> None:
    session = _session(request)
    session[_KEY] = plain
    session[_KEY_NAME] = name
    session[_KEY_SCOPES] = sorted(scopes)
    session[_CSRF] = secrets.token_urlsafe(32)  # a new token with every new key


def forget_key(request: Request) -> None:
    session = _session(request)
    for name in (_KEY, _KEY_NAME, _KEY_SCOPES):
        session.pop(name, None)


def flash(request: Request, message: str) -> None:
    """A message shown once, on the next page."""
    _session(request)[_FLASH] = message


def pop_flash(request: Request) -> str | None:
    message = _session(request).pop(_FLASH, None)
    return message if isinstance(message, str) else None


# -- the middleware ------------------------------------------------------------------------------
async def _refuse(send: Send, message: str) -> None:
    body = json.dumps({"error": {"code": "csrf_failed", "message": message, "detail": {}}}).encode(
        "utf-8"
    )
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class CookieKeyMiddleware:
    """Attach the session's API key to same-origin API requests, after checking CSRF.

    Must run inside ``SessionMiddleware`` (which puts ``scope["session"]``)."""

    def __init__(self, app: ASGIApp, prefix: str = "/api/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        session = scope.get("session")
        key = session.get(_KEY) if isinstance(session, dict) else None
        if not key or "authorization" in headers or "x-api-key" in headers:
            await self.app(scope, receive, send)
            return
        assert isinstance(session, dict)
        if scope["method"] not in SAFE_METHODS:
            if not same_origin(headers):
                await _refuse(send, "This request comes from another site; it was refused.")
                return
            if not csrf_ok(session, headers.get(CSRF_HEADER)):
                await _refuse(
                    send,
                    "This request did not carry the page's security token (CSRF). "
                    "Reload the page and try again.",
                )
                return
        raw = [*scope["headers"], (b"x-api-key", str(key).encode("latin-1", "replace"))]
        await self.app({**scope, "headers": raw}, receive, send)
