"""The web application: ``create_app(settings)``.

The lifespan makes the engine and sessionmaker (never at import), brings the schema up to
date with the real migrations, and starts the in-process job runner (unless
``run_jobs_in_process`` is off because ``kronscope worker`` processes run the jobs). A
database that is down at start does not stop the server: requests answer 503 until it is
back, and the migration (and the job runner) start with the first request that finds it
reachable. The health endpoint says which.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import anyio
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from . import __version__
from .api import api_router
from .api import explanations as explanations_api
from .api import export as export_api
from .api import inference as inference_api
from .api.errors import add_exception_handlers
from .api.fast_lane import FastLane
from .config import Settings, get_settings
from .db import DatabaseUnavailable, make_engine, make_sessionmaker, upgrade
from .db.engine import pool_capacity
from .web import register_web

log = logging.getLogger(__name__)


def _migrate(app: FastAPI) -> bool:
    """Run the migrations once; False (and retried later) while the database is down."""
    state = app.state
    with state.migrate_lock:
        if state.migrated:
            return True
        try:
            upgrade(state.engine)
        except DatabaseUnavailable as exc:
            log.warning("database unavailable at start; will retry: %s", exc)
            return False
        state.migrated = True
        return True


def _start_jobs(app: FastAPI) -> None:
    from .services.jobs import JobRunner

    settings: Settings = app.state.settings
    runner = JobRunner(make_sessionmaker(app.state.engine, begin_immediate=True), settings)
    app.state.job_runner = runner
    try:
        runner.requeue_stale()  # jobs left running by a process that died
    except Exception:
        log.warning("could not requeue stale jobs at start", exc_info=True)
    runner.start()


def _ensure_ready(app: FastAPI) -> bool:
    """Called by requests while the start-up migration has not succeeded yet."""
    if not _migrate(app):
        return False
    if app.state.settings.run_jobs_in_process and app.state.job_runner is None:
        with app.state.migrate_lock:
            if app.state.job_runner is None:
                _start_jobs(app)
    return True


# Routers that live beside ``api.routes`` (each module exposes ``router`` with its prefix).
EXTRA_API_MODULES = ("explanations", "inference", "export")


def _include_other_parts(app: FastAPI) -> None:
    """The API's other routers and the pages, when their packages are present."""
    for name in EXTRA_API_MODULES:
        full = f"{__package__}.api.{name}"
        if importlib.util.find_spec(full) is not None:
            app.include_router(importlib.import_module(full).router)
    web = importlib.import_module(f"{__package__}.web")
    register_web = getattr(web, "register_web", None)
    if register_web is not None:
        register_web(app)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        pool = settings.db_pool_size
        engine = make_engine(settings.resolved_database_url, pool_size=pool)
        app.state.engine = engine
        app.state.sessionmaker = make_sessionmaker(engine)
        app.state.write_sessionmaker = make_sessionmaker(engine, begin_immediate=True)
        # Requests hold at most this many pooled connections at once (see api.deps): as many
        # as the pool keeps open, so that no request opens and closes an overflow connection
        # of its own; the overflow is left to the job runner and streamed exports.
        app.state.db_slots = anyio.Semaphore(max(1, min(pool, pool_capacity(engine) - 3, 64)))
        app.state.page_executor = ThreadPoolExecutor(
            settings.page_threads, thread_name_prefix="kronscope-pages"
        )
        app.state.migrated = False
        app.state.migrate_lock = threading.Lock()
        app.state.job_runner = None
        app.state.ensure_ready = lambda: _ensure_ready(app)
        await run_in_threadpool(_migrate, app)
        if settings.run_jobs_in_process and app.state.migrated:
            await run_in_threadpool(_start_jobs, app)
        try:
            yield
        finally:
            runner = app.state.job_runner
            if runner is not None:
                await run_in_threadpool(runner.stop)
            inference = getattr(app.state, "inference_engine", None)
            if inference is not None:
                await run_in_threadpool(inference.close)
            app.state.page_executor.shutdown(wait=True)
            engine.dispose()

    app = FastAPI(
        title="KronScope",
        version=__version__,
        description="Feature pages, mAND composition and jobs for KronSAE (and TopK) SAEs.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    add_exception_handlers(app)
    app.include_router(api_router())
    app.include_router(inference_api.router)  # issue 6: live inference
    app.include_router(explanations_api.router)  # issue 6: explanations
    app.include_router(export_api.router)  # issue 6: export
    register_web(app)  # pages, /static, session cookie, HTML error pages
    app.add_middleware(FastLane, state=app.state)  # outermost: the hot page reads
    return app
