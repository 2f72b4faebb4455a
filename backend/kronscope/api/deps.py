"""Typed dependencies, so route signatures read like a sentence:
``def delete(sae: SAEDep, session: SessionDep, caller: DeleterDep)``.

- ``SessionDep``: one session per request, committed when the route returns (before the
  response is sent, so a failed commit is an error response) and rolled back on error;
  on SQLite, writing methods begin with the write lock held (``BEGIN IMMEDIATE``). A
  request first takes one of ``app.state.db_slots`` (fewer than the connection pool
  holds), waiting on the event loop: a worker thread never waits for a pooled connection
  while the requests holding connections wait for a thread to commit (that deadlock held
  every connection until the pool's 30 s timeout under 64 clients).
- ``SAEDep``: the ``{sae}`` path parameter resolved to its row (404 in plain words).
- ``read_json``: the feature pages' path: one trip to a page thread that opens the
  session, checks read access, reads and serialises the page (orjson), for the reads a
  dashboard makes most (see ``services.features``).
- ``ReaderDep``: reads are public unless ``require_key_for_reads``; then any live key.
- ``UploaderDep`` / ``DeleterDep`` / ``ExplainerDep`` / ``JobsDep``: a key with that scope
  (401 without a valid key, 403 without the scope); the key's name is the author.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
import orjson
from fastapi import Depends, Path, Request, Response, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ..config import Settings
from ..db.errors import DatabaseUnavailable
from ..db.models import Sae
from ..db.raw import RawReader
from ..services import keys as key_service
from ..services import sae_registry, tx
from ..services.errors import ServiceUnavailable
from ..services.keys import Caller


async def get_settings(request: Request) -> Settings:  # async: no thread hop for a lookup
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def ensure_database(request: Request) -> None:
    """503 in plain words while the schema could not be brought up (database down at start)."""
    state = request.app.state
    if not state.migrated and not await run_in_threadpool(state.ensure_ready):
        raise ServiceUnavailable(
            "The database cannot be reached right now; try again in a few seconds."
        )


def _end(session: Session, finish: Callable[[Session], None]) -> None:
    """Commit or roll back, then close (giving the connection back) whatever happened."""
    try:
        finish(session)
    finally:
        session.close()


async def get_session(request: Request) -> AsyncIterator[Session]:
    state = request.app.state
    await ensure_database(request)
    async with state.db_slots:
        # Writes take SQLite's write lock when they begin (BEGIN IMMEDIATE): a transaction
        # that reads and then writes could otherwise fail at once if another writer (the job
        # runner) committed in between. Reads stay deferred, so they never wait for a writer.
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            session: Session = state.write_sessionmaker()
        else:
            session = state.sessionmaker()
        try:
            yield session
        except BaseException:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(_end, session, tx.rollback)
            raise
        # One trip to the thread pool for commit and close (each trip costs a thread switch).
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_end, session, tx.commit)


SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="An API key: 'Authorization: Bearer <key>'.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


def _plain_key(
    bearer: HTTPAuthorizationCredentials | None, x_api_key: str | None, request: Request
) -> str | None:
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    if bearer is not None:
        return bearer.credentials
    # An Authorization header that is not "Bearer ..." deserves its own message.
    return key_service.key_from_headers(request.headers.get("authorization"), None)


def require_scope(scope: str | None) -> Callable[..., Caller]:
    def dependency(
        request: Request,
        session: SessionDep,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        x_api_key: Annotated[str | None, Security(_api_key)],
    ) -> Caller:
        return key_service.authenticate(session, _plain_key(bearer, x_api_key, request), scope)

    dependency.__name__ = f"require_{scope or 'key'}"
    return dependency


def require_read(request: Request, settings: Settings, session: Session) -> Caller | None:
    """Reads are public unless ``require_key_for_reads``; then any live key (sync, for
    callers that check access themselves)."""
    if not settings.require_key_for_reads:
        return None
    plain = key_service.key_from_headers(
        request.headers.get("authorization"), request.headers.get("x-api-key")
    )
    return key_service.authenticate(session, plain, None)


async def read_access(
    request: Request, settings: SettingsDep, session: SessionDep
) -> Caller | None:
    # The schema declares no security for reads (they are public by default). Async, so
    # that the public case costs no thread hop.
    if not settings.require_key_for_reads:
        return None
    return await run_in_threadpool(require_read, request, settings, session)


ReaderDep = Annotated[Caller | None, Depends(read_access)]
UploaderDep = Annotated[Caller, Depends(require_scope("upload"))]
DeleterDep = Annotated[Caller, Depends(require_scope("delete"))]
ExplainerDep = Annotated[Caller, Depends(require_scope("explanations"))]
JobsDep = Annotated[Caller, Depends(require_scope("jobs"))]


SaeSlug = Annotated[str, Path(min_length=1, max_length=128, description="The SAE's slug.")]


def get_sae(session: SessionDep, sae: SaeSlug) -> Sae:
    return sae_registry.get_sae(session, sae)


SAEDep = Annotated[Sae, Depends(get_sae)]


def _json_default(value: Any) -> Any:
    """What orjson does not know natively: numpy scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(body: Any) -> bytes:
    """JSON bytes as the API writes them (UTC timestamps end in ``Z``, as pydantic's do)."""
    return orjson.dumps(
        body, default=_json_default, option=orjson.OPT_UTC_Z | orjson.OPT_SERIALIZE_NUMPY
    )


async def page_bytes(
    state: Any, read: Callable[[RawReader], Any], request: Request | None
) -> bytes:
    """``read(reader)`` serialised, in one trip to a page thread (``Settings.page_threads``,
    not the shared pool), under a database slot (see ``get_session``), on a pooled
    connection outside any transaction (``RawReader.pooled``: no Session). ``request``
    is checked for a key when reads need one (the fast lane never asks then)."""
    if not state.migrated and not await run_in_threadpool(state.ensure_ready):
        raise ServiceUnavailable(
            "The database cannot be reached right now; try again in a few seconds."
        )

    def attempt() -> bytes:
        with RawReader.pooled(state.engine) as reader:
            if state.settings.require_key_for_reads:
                assert request is not None
                with reader.orm_session() as session:
                    require_read(request, state.settings, session)
            return dumps(read(reader))

    def run() -> bytes:
        try:
            return attempt()
        except DatabaseUnavailable as exc:
            # A pooled connection the server had dropped (it restarted): the pool has been
            # replaced, and a read can simply run again on a fresh connection.
            if not getattr(exc, "broken_connection", False):
                raise
            return attempt()

    async with state.db_slots:
        with anyio.CancelScope(shield=True):  # the connection goes back whatever the client does
            loop = asyncio.get_running_loop()
            content: bytes = await loop.run_in_executor(state.page_executor, run)
    return content


async def read_json(request: Request, read: Callable[[RawReader], Any]) -> Response:
    """Serve a read-only page (``page_bytes``): the bytes go out as they are. The route's
    ``response_model`` documents the shape; tests check the pages against it (validating
    each response again here cost more than the reads)."""
    content = await page_bytes(request.app.state, read, request)
    return Response(content, media_type="application/json")
