"""``kronscope explain SLUG``: generate explanations in this process (no job queue).

The same generation as ``POST /saes/{sae}/explain`` (``services.explanations``): every
text is generated first and all are written in one transaction at the end, so an
interrupted or failed run writes nothing.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain(
        sae: str = typer.Argument(..., help="Slug of the SAE."),
        backend: str = typer.Option("heuristic", "--backend", help="heuristic or llm."),
        units: str = typer.Option("latents", "--units", help="latents, parents or all."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Revise this source's explanations instead of skipping."
        ),
        limit: int | None = typer.Option(
            None, "--limit", min=1, help="First N units of each kind."
        ),
        author: str = typer.Option("cli", "--author", help="Recorded as the explanations' author."),
        url: str | None = typer.Option(
            None, "--url", help="Database URL (default: from settings)."
        ),
    ) -> None:
        """Explain an SAE's latents and/or parents from its active harvest."""
        from tqdm import tqdm

        from ..config import get_settings
        from ..db import make_engine, make_sessionmaker, upgrade
        from ..db.repositories import saes as sae_repo
        from ..services import explanations as svc
        from ..services.errors import KronScopeError
        from ..services.explainers import ExplainerError

        if backend not in ("heuristic", "llm") or units not in ("latents", "parents", "all"):
            typer.echo(
                "error: --backend is heuristic or llm; --units latents, parents or all", err=True
            )
            raise typer.Exit(2)
        settings = get_settings()
        engine = make_engine(url or settings.resolved_database_url)
        try:
            upgrade(engine)
            factory = make_sessionmaker(engine, begin_immediate=True)
            with factory() as s:
                row = sae_repo.get_sae_by_slug(s, sae)
                if row is None:
                    typer.echo(f"error: there is no SAE named {sae!r}", err=True)
                    raise typer.Exit(2)
                sae_id = row.id
            params = {
                "backend": backend,
                "units": units,
                "overwrite": overwrite,
                "author": author,
                "limit": limit,
            }
            bar = tqdm(desc=f"explain {sae}", unit="unit")

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            try:
                result = svc.generate(factory, settings, sae_id, params, progress)
            except (ExplainerError, KronScopeError) as exc:
                bar.close()
                typer.echo(f"error: {exc}; nothing was written", err=True)
                raise typer.Exit(1) from exc
            bar.close()
            typer.echo(f"{sae}: {result.message()}")
        finally:
            engine.dispose()
