"""Jinja2 set-up for the pages: autoescaped environment, filters, and the page response.

Token strings come from arbitrary text. Templates print them only through autoescape
(never ``|safe``); the ``tok`` filter additionally makes whitespace and control
characters visible, exactly as ``frontend/static/js/tokens.js`` does in the browser.
"""

from __future__ import annotations

import math
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse

from .. import __version__
from . import session as web_session

FRONTEND_DIR = Path(__file__).resolve().parents[3] / "frontend"
TEMPLATES_DIR = FRONTEND_DIR / "templates"
STATIC_DIR = FRONTEND_DIR / "static"

SHADE_LEVELS = 10
"""Token and heat-map shading uses classes ``s0`` (none) .. ``s10`` (the maximum)."""

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
"""Pages run only the project's own scripts: even an escaping mistake could not run code."""

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "\\r"}


# -- filters --------------------------------------------------------------------------------------
def visible_token(token: str) -> str:
    """A token as a person should see it: spaces at its edges as '·', newlines as '↵', tabs
    as '⇥', other control and invisible format characters as ``\\xNN`` / ``\\uNNNN``."""
    out: list[str] = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")
        else:
            out.append(ch)
    text = "".join(out)
    stripped = text.strip(" ")
    if not stripped:
        return "·" * len(text)
    lead = len(text) - len(text.lstrip(" "))
    trail = len(text) - len(text.rstrip(" "))
    return "·" * lead + stripped + "·" * trail


def fmt_num(value: Any, digits: int = 3) -> str:
    """Numbers for people: thousands separators, ``digits`` significant figures, '—' for none."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    if abs(x) < 10 ** -(digits + 1):
        return f"{x:.{max(digits - 1, 0)}e}"
    return f"{x:.{digits}g}"


def fmt_pct(value: Any) -> str:
    """A fraction as a percentage with enough digits to tell rare latents apart."""
    if value is None:
        return "—"
    x = float(value) * 100
    if not math.isfinite(x):
        return "—"
    if x == 0:
        return "0%"
    if x >= 1:
        return f"{x:.2f}%"
    return f"{x:.2g}%" if x >= 0.01 else f"{x:.1e}%"


def shade(value: Any, top: Any) -> int:
    """Shading level 0..10 of ``value`` on a scale whose maximum is ``top`` (0: not active)."""
    try:
        v, t = float(value), float(top)
    except (TypeError, ValueError):
        return 0
    if not (math.isfinite(v) and math.isfinite(t)) or v <= 0 or t <= 0:
        return 0
    return max(1, min(SHADE_LEVELS, math.ceil(SHADE_LEVELS * v / t)))


def query_string(params: dict[str, Any], **changes: Any) -> str:
    """``?a=1&b=2`` from ``params`` with ``changes`` applied; None and '' are left out."""
    merged = {**params, **changes}
    pairs = [(k, v) for k, v in merged.items() if v is not None and v != ""]
    return "?" + urlencode(pairs) if pairs else ""


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(tok=visible_token, num=fmt_num, pct=fmt_pct)
    env.globals.update(shade=shade, qs=query_string, version=__version__)
    return env


templates = Jinja2Templates(env=_env())


# -- responses --------------------------------------------------------------------------------------
def base_context(request: Request) -> dict[str, Any]:
    """What ``base.html`` needs: the CSRF token, who is signed in, a one-time message."""
    return {
        "csrf_token": web_session.csrf_token(request),
        "key": web_session.key_identity(request),
        "flash": web_session.pop_flash(request),
        "path": request.url.path,
    }


def render(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    response = templates.TemplateResponse(
        request,
        template,
        {**base_context(request), **context},
        status_code=status_code,
        headers=PAGE_HEADERS,
    )
    return response
