"""``kronscope keys create | list | revoke``: API keys for writes (stored hashed)."""

from __future__ import annotations

import typer


def _session():  # type: ignore[no-untyped-def]
    from ..config import get_settings
    from ..db import make_engine, make_sessionmaker, upgrade

    engine = make_engine(get_settings().resolved_database_url)
    upgrade(engine)
    return engine, make_sessionmaker(engine)


def register(app: typer.Typer) -> None:
    keys_app = typer.Typer(
        help="API keys: create (shown once), list, revoke.", no_args_is_help=True
    )

    @keys_app.command("create")
    def create(
        name: str = typer.Option(
            ..., "--name", help="Who uses the key; recorded as author/uploader."
        ),
        scopes: str = typer.Option(
            ..., "--scopes", help="Comma-separated: upload, delete, explanations, jobs."
        ),
    ) -> None:
        """Create a key and print it once (only its hash is stored)."""
        from ..services import keys as key_service
        from ..services import tx
        from ..services.errors import KronScopeError

        engine, factory = _session()
        try:
            with factory() as session:
                try:
                    key, plain = key_service.create_key(session, name, scopes)
                except KronScopeError as exc:
                    typer.echo(f"error: {exc.message}", err=True)
                    raise typer.Exit(2) from exc
                tx.commit(session)
                typer.echo(plain)
                typer.echo(
                    f"key {key.id} {key.name!r} scopes {','.join(key.scopes)}: store it now, "
                    "it cannot be shown again",
                    err=True,
                )
        finally:
            engine.dispose()

    @keys_app.command("list")
    def list_cmd(
        all_: bool = typer.Option(False, "--all", help="Include revoked keys."),
    ) -> None:
        """List keys (id, prefix, name, scopes, last use); never the keys themselves."""
        from ..db.repositories import keys as key_repo

        engine, factory = _session()
        try:
            with factory() as session:
                rows = key_repo.list_keys(session, include_revoked=all_)
                if not rows:
                    typer.echo("no keys")
                for k in rows:
                    state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
                    used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never"
                    typer.echo(
                        f"{k.id}\t{k.prefix}…\t{k.name}\t{','.join(k.scopes or [])}\t{state}\tlast used {used}"
                    )
        finally:
            engine.dispose()

    @keys_app.command("revoke")
    def revoke(key_id: int = typer.Argument(..., help="The key's id (see 'keys list').")) -> None:
        """Revoke a key: requests with it get 401 from now on."""
        from ..db.errors import NotFound
        from ..db.repositories import keys as key_repo
        from ..services import tx

        engine, factory = _session()
        try:
            with factory() as session:
                try:
                    key = key_repo.revoke_key(session, key_id)
                except NotFound as exc:
                    typer.echo(f"error: {exc}", err=True)
                    raise typer.Exit(2) from exc
                tx.commit(session)
                typer.echo(f"revoked key {key.id} {key.name!r}")
        finally:
            engine.dispose()

    app.add_typer(keys_app, name="keys")
