"""``kronscope import FILE --sae SLUG``: read an export (ours or Neuronpedia's) into an SAE.

FILE is a KronScope export (zip or JSON lines), a Neuronpedia export folder or a zip of
one, or single ``.jsonl`` / ``.jsonl.gz`` batch files. Everything is validated first;
then explanations (and, unless ``--no-harvest``, features and activations as a new active
harvest) are written in one transaction. A malformed file or one for another SAE (d_sae,
model or hook differ) is refused with the reason, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_(
        file: Path = typer.Argument(
            ..., help="Export zip, JSONL file or Neuronpedia export folder."
        ),
        sae: str = typer.Option(..., "--sae", help="Slug of the SAE to import into."),
        author: str = typer.Option(
            "import", "--author", help="Author of explanations whose record names none."
        ),
        allow_mismatch: bool = typer.Option(
            False,
            "--allow-mismatch",
            help="Accept records naming another model or hook (d_sae must still match).",
        ),
        harvest: bool = typer.Option(
            True,
            "--harvest/--no-harvest",
            help="Also import features and activations as a harvest.",
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate only; write nothing."),
        url: str | None = typer.Option(
            None, "--url", help="Database URL (default: from settings)."
        ),
    ) -> None:
        """Import explanations (and features/activations) from an export into an SAE."""
        from ..config import get_settings
        from ..db import make_engine, make_sessionmaker, upgrade
        from ..services.errors import KronScopeError
        from ..services.export import import_file

        engine = make_engine(url or get_settings().resolved_database_url)
        try:
            upgrade(engine)
            factory = make_sessionmaker(engine, begin_immediate=True)
            try:
                result = import_file(
                    factory,
                    sae,
                    file,
                    author=author,
                    allow_mismatch=allow_mismatch,
                    harvest=harvest,
                    dry_run=dry_run,
                )
            except KronScopeError as exc:
                typer.echo(f"error: {exc.message} Nothing was written.", err=True)
                raise typer.Exit(2) from exc
            typer.echo(f"{sae}: {result.message()}")
        finally:
            engine.dispose()
