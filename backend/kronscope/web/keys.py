"""``/key``: enter an API key once (kept in the signed httpOnly session cookie), or forget it.

Both forms are CSRF-checked (synchronizer token in the session, ``csrf_token`` field)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import RedirectResponse, Response

from ..api.deps import SessionDep
from ..services import keys as key_service
from ..services.errors import Forbidden, Unauthorized
from . import session as web_session
from .context import check_stored_key
from .templating import render

router = APIRouter(include_in_schema=False)


def _local(path: str | None) -> str:
    """Only paths on this site are followed after signing in (no open redirect)."""
    if path and path.startswith("/") and not path.startswith("//") and "\\" not in path:
        return path
    return "/"


def _check_csrf(request: Request, token: str | None) -> None:
    if not web_session.same_origin(request.headers):
        raise Forbidden("This form was sent from another site; it was refused.")
    if not web_session.csrf_ok(request.scope.get("session") or {}, token):
        raise Forbidden(
            "The form's security token (CSRF) is missing or out of date. Reload the page and try again."
        )


@router.get("/key")
def key_page(request: Request, session: SessionDep, next: str | None = None) -> Response:
    caller = check_stored_key(request, session)
    return render(
        request,
        "key.html",
        {"caller": caller, "next": _local(next), "error": None, "scopes": key_service.SCOPES},
    )


@router.post("/key")
def save_key(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form(max_length=512)] = "",
    csrf_token: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    _check_csrf(request, csrf_token)
    plain = api_key.strip()
    error: str | None = None
    if not plain:
        error = "Paste an API key first (it starts with ks_)."
    else:
        try:
            caller = key_service.authenticate(session, plain, None)
        except Unauthorized:
            error = (
                "That key is not valid: it is unknown or has been revoked. Check that you "
                "copied all of it, or ask for a new one (kronscope keys create)."
            )
    if error is not None:
        return render(
            request,
            "key.html",
            {"caller": None, "next": _local(next), "error": error, "scopes": key_service.SCOPES},
            status_code=422,
        )
    web_session.store_key(request, plain, caller.name, list(caller.scopes))
    web_session.flash(request, f"Signed in with the key {caller.name!r}.")
    return RedirectResponse(_local(next), status_code=303)


@router.post("/key/forget")
def forget_key(request: Request, csrf_token: Annotated[str, Form(max_length=256)] = "") -> Response:
    _check_csrf(request, csrf_token)
    web_session.forget_key(request)
    web_session.flash(
        request, "The key is forgotten: this browser can read but not change anything."
    )
    return RedirectResponse("/key", status_code=303)
