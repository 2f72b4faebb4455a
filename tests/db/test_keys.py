"""API keys: shown once, stored hashed, verified, revoked."""

from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session

from kronscope.db.repositories import keys


def test_create_verify_revoke(db_session: Session) -> None:
    key, plain = keys.create_key(db_session, "ci", ["write", "explain", "write"])
    assert plain.startswith("ks_") and len(plain) > 40
    assert key.key_hash == hashlib.sha256(plain.encode()).hexdigest() != plain
    assert key.prefix == plain[:10] and key.scopes == ["explain", "write"]
    assert plain not in repr(vars(key))

    found = keys.verify_key(db_session, plain)
    assert found is not None and found.id == key.id and found.last_used_at is not None
    assert keys.verify_key(db_session, plain[:-1] + ("A" if plain[-1] != "A" else "B")) is None
    assert keys.verify_key(db_session, "") is None
    assert keys.verify_key(db_session, "not-a-key") is None
    assert keys.verify_key(db_session, "ks_" + "x" * 1000) is None

    other, other_plain = keys.create_key(db_session, "other")
    keys.revoke_key(db_session, key.id)
    assert key.revoked_at is not None
    assert keys.verify_key(db_session, plain) is None
    assert keys.verify_key(db_session, other_plain) is not None
    assert [k.id for k in keys.list_keys(db_session)] == [other.id]
    assert {k.id for k in keys.list_keys(db_session, include_revoked=True)} == {key.id, other.id}


def test_last_used_is_not_rewritten_every_request(db_session: Session) -> None:
    key, plain = keys.create_key(db_session, "web")
    keys.verify_key(db_session, plain)
    first = key.last_used_at
    keys.verify_key(db_session, plain)
    assert key.last_used_at == first
