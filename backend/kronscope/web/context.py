"""What every page route shares: the page context dependency and the error pages.

``PageDep`` gives a route its database session, the settings and the person's API key
(checked against the database on every page, so a revoked key is noticed at once and
dropped with a plain message). Errors anywhere under a page path render ``404.html`` or
``error.html`` through ``render_error_page`` (installed by ``register_web``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from ..api.deps import SessionDep, SettingsDep
from ..config import Settings
from ..services import keys as key_service
from ..services.errors import NotFound, Unauthorized
from ..services.keys import Caller
from . import session as web_session
from .templating import render

MAX_PREFILL = 32_768
"""Longest text a deep link may pre-fill into a form (the API's own limit decides the rest)."""

REVOKED_MESSAGE = (
    "The API key you entered earlier is no longer valid: it was revoked or is unknown. "
    "Enter a new key to make changes."
)


@dataclass
class PageContext:
    request: Request
    session: Session
    settings: Settings
    caller: Caller | None

    def can(self, scope: str) -> bool:
        return self.caller is not None and scope in self.caller.scopes

    def render(self, template: str, status_code: int = 200, **context: Any) -> Response:
        return render(self.request, template, {"caller": self.caller, **context}, status_code)


def check_stored_key(request: Request, session: Session) -> Caller | None:
    """The caller behind the session's key; a key no longer valid is forgotten, with a message."""
    plain = web_session.stored_key(request)
    if plain is None:
        return None
    try:
        caller = key_service.authenticate(session, plain, None)
    except Unauthorized:
        web_session.forget_key(request)
        web_session.flash(request, REVOKED_MESSAGE)
        return None
    if web_session.key_identity(request) != (caller.name, sorted(caller.scopes)):
        web_session.store_key(request, plain, caller.name, list(caller.scopes))
    return caller


def page_context(request: Request, session: SessionDep, settings: SettingsDep) -> PageContext:
    caller = check_stored_key(request, session)
    if settings.require_key_for_reads and caller is None:
        raise Unauthorized(
            "This server shows its pages only with an API key: enter one on the key page."
        )
    return PageContext(request, session, settings, caller)


PageDep = Annotated[PageContext, Depends(page_context)]


def parse_index(value: str, what: str) -> int:
    """A path segment that must be a whole number; anything else is an unknown page (404)."""
    text = value.strip()
    if not text.isdigit() or len(text) > 12:
        raise NotFound(f"There is no {what} {value!r}: {what}s are numbered 0, 1, 2, ...")
    return int(text)


_TITLES = {
    400: "Bad request",
    401: "An API key is needed",
    403: "Not allowed",
    404: "Page not found",
    405: "Not allowed",
    409: "Conflict",
    413: "Too large",
    422: "Not valid",
    503: "Unavailable",
}


def render_error_page(request: Request, status: int, code: str, message: str) -> Response:
    """Error pages for paths outside ``/api`` (no database access: the database may be down)."""
    template = "404.html" if status == 404 else "error.html"
    title = _TITLES.get(status, "Something went wrong")
    return render(
        request,
        template,
        {"caller": None, "status": status, "code": code, "message": message, "title": title},
        status,
    )
