"""``kronscope db upgrade`` / ``kronscope db current``: the schema, by the real migrations."""

from __future__ import annotations

import typer


def _url(url: str | None) -> str:
    if url:
        return url
    from ..config import get_settings

    return get_settings().resolved_database_url


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(
        help="Database schema: upgrade it, or show its revision.", no_args_is_help=True
    )

    @db_app.command("upgrade")
    def upgrade_cmd(
        url: str | None = typer.Option(
            None,
            "--url",
            help="SQLAlchemy URL (default: KRONSCOPE_DATABASE_URL or the data dir's SQLite file).",
        ),
        revision: str = typer.Option("head", "--revision", help="Target revision."),
    ) -> None:
        """Create or migrate the schema to the newest revision."""
        from ..db.engine import current_revision, upgrade
        from ..db.errors import DatabaseUnavailable

        target = _url(url)
        try:
            before = current_revision(target)
            upgrade(target, revision)
            after = current_revision(target)
        except DatabaseUnavailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        if before == after:
            typer.echo(f"{_shown(target)}: already at {after}")
        else:
            typer.echo(f"{_shown(target)}: upgraded {before or 'empty'} -> {after}")

    @db_app.command("current")
    def current_cmd(
        url: str | None = typer.Option(
            None, "--url", help="SQLAlchemy URL (default: from settings)."
        ),
    ) -> None:
        """Show the database's revision and the newest one this code knows."""
        from ..db.engine import current_revision, head_revision
        from ..db.errors import DatabaseUnavailable

        target = _url(url)
        try:
            current = current_revision(target)
        except DatabaseUnavailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        head = head_revision()
        state = "up to date" if current == head else "needs `kronscope db upgrade`"
        typer.echo(f"{_shown(target)}: at {current or 'empty (no schema)'}, head {head} ({state})")

    app.add_typer(db_app, name="db")
