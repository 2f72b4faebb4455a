"""``kronscope worker``: run queued jobs (harvests, ...) in this process until stopped.

For PostgreSQL deployments: run as many as you like beside ``kronscope serve --no-jobs``;
each job is claimed by exactly one worker. Ctrl-C (or SIGTERM) hands a running job back to
the queue, and it resumes from its saved state.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        once: bool = typer.Option(
            False, "--once", help="Run queued jobs until none is left, then exit."
        ),
    ) -> None:
        """Run jobs from the queue until stopped."""
        import logging
        import signal
        import threading

        from ..config import get_settings
        from ..db import DatabaseUnavailable, make_engine, make_sessionmaker, upgrade
        from ..services.jobs import JobRunner

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        settings = get_settings()
        engine = make_engine(settings.resolved_database_url)
        try:
            upgrade(engine)
        except DatabaseUnavailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        runner = JobRunner(make_sessionmaker(engine, begin_immediate=True), settings)
        typer.echo(
            f"worker {runner.worker_id} on {engine.url.render_as_string(hide_password=True)}"
        )
        try:
            if once:
                runner.requeue_stale()
                while runner.run_once():
                    pass
                return
            done = threading.Event()

            def _stop(signum: int, frame: object) -> None:
                done.set()

            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, _stop)
            runner.start()
            while not done.wait(1.0):
                if not runner.alive:
                    break
            typer.echo("stopping: a running job goes back to the queue")
            runner.stop(timeout=60.0)
        finally:
            engine.dispose()
