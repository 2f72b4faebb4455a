"""API keys: only a sha256 of each key is stored; the plain key is shown once.

Keys look like ``ks_<43 url-safe chars>`` (256 random bits). ``prefix`` (the first 10
characters) is stored for display and to narrow the lookup; the match itself compares
hashes with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..base import utcnow
from ..errors import NotFound
from ..models import ApiKey

KEY_PREFIX = "ks_"
PREFIX_LEN = 10
# last_used_at is a hint, not an audit log: write it at most once a minute per key.
_TOUCH_EVERY = timedelta(seconds=60)


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str, scopes: list[str] | None = None) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plain key (never stored, shown once)."""
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        name=name,
        prefix=plain[:PREFIX_LEN],
        key_hash=hash_key(plain),
        scopes=sorted(set(scopes or [])),
    )
    session.add(key)
    session.flush()
    return key, plain


def verify_key(session: Session, plain: str, *, touch: bool = True) -> ApiKey | None:
    """The live key matching ``plain``, or None (unknown, malformed or revoked)."""
    if not plain or not plain.startswith(KEY_PREFIX) or len(plain) > 256:
        return None
    digest = hash_key(plain)
    found: ApiKey | None = None
    for key in session.scalars(sa.select(ApiKey).where(ApiKey.prefix == plain[:PREFIX_LEN])):
        if hmac.compare_digest(key.key_hash, digest) and key.revoked_at is None:
            found = key
    if found is not None and touch:
        now = utcnow()
        if found.last_used_at is None or now - found.last_used_at > _TOUCH_EVERY:
            found.last_used_at = now
            session.flush()
    return found


def revoke_key(session: Session, key_id: int) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def list_keys(session: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    stmt = sa.select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt))
