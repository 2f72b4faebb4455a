"""Transaction edges shared by the request session and the job runner.

Services only ``flush()``; whoever owns the session commits. Work that must follow the
outcome (remove a deleted SAE's files once the delete is committed; remove freshly stored
files when the transaction rolls back) is registered with ``on_commit`` / ``on_rollback``
and run by ``commit`` / ``rollback`` here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

_COMMIT = "kronscope_on_commit"
_ROLLBACK = "kronscope_on_rollback"


def on_commit(session: Session, fn: Callable[[], None]) -> None:
    session.info.setdefault(_COMMIT, []).append(fn)


def on_rollback(session: Session, fn: Callable[[], None]) -> None:
    session.info.setdefault(_ROLLBACK, []).append(fn)


def _run(session: Session, key: str) -> None:
    callbacks = session.info.pop(key, [])
    for fn in callbacks:
        try:
            fn()
        except Exception:  # a clean-up failing must not hide the outcome
            log.exception("post-transaction callback failed")


def commit(session: Session) -> None:
    try:
        session.commit()
    except BaseException:
        rollback(session)
        raise
    session.info.pop(_ROLLBACK, None)
    _run(session, _COMMIT)


def rollback(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.info.pop(_COMMIT, None)
        _run(session, _ROLLBACK)
