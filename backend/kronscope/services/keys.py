"""API keys: the scopes that exist, creating keys (shown once), checking a request's key.

Keys are stored hashed by ``db.repositories.keys``; this module adds what callers need on
top: the scope vocabulary and the 401/403 decisions, in plain words.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from ..db.models import ApiKey
from ..db.repositories import keys as key_repo
from .errors import Forbidden, Unauthorized, Unprocessable

SCOPES: dict[str, str] = {
    "upload": "upload checkpoints and start harvests",
    "delete": "delete SAEs and their data",
    "explanations": "write, edit and delete explanations; start explanation jobs",
    "jobs": "start and cancel jobs",
}
"""Every scope a key may have, with what it allows."""


@dataclass(frozen=True)
class Caller:
    """Who made a request: the key's name is recorded as author / uploader."""

    key_id: int
    name: str
    scopes: frozenset[str]


def parse_scopes(text: str | list[str]) -> list[str]:
    """``"upload,delete"`` (or a list) -> validated, sorted, unique scopes."""
    raw = text.split(",") if isinstance(text, str) else list(text)
    scopes = sorted({s.strip() for s in raw if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise Unprocessable(
            f"Unknown scope {unknown[0]!r}; the scopes are {', '.join(SCOPES)}.",
            detail={"scopes": list(SCOPES)},
        )
    if not scopes:
        raise Unprocessable(f"Give at least one scope: {', '.join(SCOPES)}.")
    return scopes


def create_key(session: Session, name: str, scopes: str | list[str]) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plain key, which is never stored."""
    name = name.strip()
    if not name:
        raise Unprocessable("A key needs a name (it is recorded as the author of what it writes).")
    if len(name) > 256:
        raise Unprocessable("A key's name may have at most 256 characters.")
    return key_repo.create_key(session, name, parse_scopes(scopes))


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise Unauthorized(
            "The Authorization header must be 'Bearer <api key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


def authenticate(session: Session, plain: str | None, scope: str | None) -> Caller:
    """The caller behind ``plain``; 401 without a (live) key, 403 without ``scope``."""
    if not plain:
        what = f"a key with the {scope!r} scope" if scope else "a key"
        raise Unauthorized(
            f"This needs an API key: send {what} as 'Authorization: Bearer <key>' or 'X-API-Key'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = key_repo.verify_key(session, plain)
    if key is None:
        raise Unauthorized(
            "The API key is not valid (unknown or revoked).", headers={"WWW-Authenticate": "Bearer"}
        )
    scopes = frozenset(key.scopes or [])
    if scope is not None and scope not in scopes:
        raise Forbidden(
            f"The key {key.name!r} lacks the {scope!r} scope needed here "
            f"(it has: {', '.join(sorted(scopes)) or 'none'}).",
            detail={"required_scope": scope},
        )
    return Caller(key_id=key.id, name=key.name, scopes=scopes)
