"""``kronscope serve``: the web application under uvicorn."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
        workers: int = typer.Option(
            1,
            "--workers",
            min=1,
            help="Processes (more than one needs PostgreSQL and 'kronscope worker').",
        ),
        no_jobs: bool = typer.Option(
            False, "--no-jobs", help="Do not run jobs in this process (run 'kronscope worker')."
        ),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
        access_log: bool = typer.Option(
            True, "--access-log/--no-access-log", help="Log each request."
        ),
    ) -> None:
        """Serve the API and pages (OpenAPI at /api/v1/openapi.json, docs at /docs)."""
        import os

        import uvicorn

        from .. import serving as reuse_port
        from ..config import Settings

        if no_jobs:
            os.environ["KRONSCOPE_RUN_JOBS_IN_PROCESS"] = "false"
        settings = Settings()
        if workers > 1 and settings.resolved_database_url.startswith("sqlite"):
            typer.echo("error: several workers need PostgreSQL (KRONSCOPE_DATABASE_URL)", err=True)
            raise typer.Exit(2)
        if workers > 1 and "page_threads" not in settings.model_fields_set:
            # Each worker is a process with its own page threads: share the cores among them
            # (on 2 cores, 2 workers x 1 thread serve a page load with a shorter tail than
            # 2 x 2).
            threads = min(settings.page_threads, max(1, (os.cpu_count() or 1) // workers))
            os.environ["KRONSCOPE_PAGE_THREADS"] = str(threads)
        if workers > 1 and reuse_port.supported():
            options = {"log_level": log_level, "access_log": access_log}
            raise typer.Exit(reuse_port.serve(workers, host, port, options))
        uvicorn.run(
            "kronscope.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            access_log=access_log,
        )
