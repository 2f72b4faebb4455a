"""The pages: server-rendered Jinja templates (``frontend/templates``) and plain ES modules
(``frontend/static``), over the same services as the JSON API.

``register_web(app)`` adds everything the pages need to an app made by ``create_app``:

- the page routes (browse, tools, ``/key``) and ``/static``;
- the session cookie (signed, httpOnly) that keeps a person's API key, and the middleware
  that attaches it, CSRF-checked, to the pages' own API calls (``web.session``);
- HTML error pages (404 and the rest) for every path outside ``/api``: the API's exception
  handlers are installed again with a page renderer, so errors keep one source of truth.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.sessions import SessionMiddleware
from starlette.staticfiles import StaticFiles

from ..api.errors import add_exception_handlers
from ..config import Settings
from . import keys, pages, tools
from .context import render_error_page
from .session import SESSION_COOKIE, CookieKeyMiddleware, session_secret
from .templating import STATIC_DIR

SESSION_MAX_AGE_S = 14 * 24 * 3600
"""How long a browser keeps an entered key without using the site."""


def register_web(app: FastAPI) -> None:
    """Add the pages to ``app`` (once: a second call does nothing)."""
    if getattr(app.state, "web_registered", False):
        return
    app.state.web_registered = True
    settings: Settings = app.state.settings
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (pages, tools, keys):
        app.include_router(module.router)
    # Added first, so it runs inside the session middleware and sees scope["session"].
    app.add_middleware(CookieKeyMiddleware)
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie=SESSION_COOKIE,
        max_age=SESSION_MAX_AGE_S,
        same_site="lax",
        https_only=settings.environment == "production",
    )
    add_exception_handlers(app, page_renderer=render_error_page)


__all__ = ["register_web"]
