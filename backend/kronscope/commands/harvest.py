"""``kronscope harvest``: one pass of an SAE's subject model and the SAE over a corpus.

``--sae`` is a registered slug or a checkpoint path; a path not registered yet is
registered first (stored under ``data_dir/saes/<slug>/``, as an upload would be). The
harvest resumes by itself: the same command after a crash, a Ctrl-C or a database outage
goes on from the last saved state. Under ``torchrun --nproc-per-node P kronscope harvest
...`` the contexts are sharded over the P processes and merged exactly on rank 0.
Exit codes: 0 done, 1 the harvest failed (the reason is printed and recorded), 2 bad
arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from ..config import Settings


def register(app: typer.Typer) -> None:
    @app.command("harvest")
    def harvest_cmd(
        sae: str = typer.Option(..., "--sae", help="SAE slug, or a checkpoint path to register."),
        corpus: str = typer.Option(
            "builtin", "--corpus", help="Corpus: builtin, a .txt/.md/.jsonl file or a folder."
        ),
        tokens: int = typer.Option(..., "--tokens", min=1, help="Tokens to harvest."),
        ctx_len: int = typer.Option(128, "--ctx-len", min=2, help="Tokens per context."),
        examples: int = typer.Option(20, "--examples", min=1, help="Top contexts per unit."),
        samples: int = typer.Option(32, "--samples", min=1, help="Sampled tokens per unit."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Contexts per batch."),
        seed: int = typer.Option(0, "--seed", min=0, help="Corpus shuffle and sampling seed."),
        checkpoint_every: int = typer.Option(
            2048, "--checkpoint-every", min=0, help="Save the state every N contexts (0: never)."
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        db_url: str | None = typer.Option(
            None, "--db-url", help="Database URL (default: from settings)."
        ),
        restart: bool = typer.Option(
            False, "--restart", help="Ignore an unfinished harvest of the same run; start over."
        ),
    ) -> None:
        """Harvest top and sampled examples and statistics of every latent and parent."""
        import torch

        from ..config import get_settings, resolve_device
        from ..db import DatabaseError, make_engine, make_sessionmaker, upgrade
        from ..harvest import HarvestError, HarvestParams
        from ..harvest.distributed import shard_from_env
        from ..harvest.runner import harvest
        from ..lm import (
            CorpusError,
            HookError,
            ModelNotFoundError,
            load_corpus,
            load_model,
            make_contexts,
        )
        from ..sae import SAEError

        settings = get_settings()
        shard = shard_from_env()
        say = typer.echo if shard.is_main else (lambda *_a, **_k: None)
        try:
            dev = resolve_device(settings.device if device == "auto" else device)
        except (RuntimeError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        if dev.startswith("cuda") and shard.distributed:
            dev = f"cuda:{shard.local_rank}"
            torch.cuda.set_device(shard.local_rank)
        try:
            params = HarvestParams(
                examples=examples,
                samples=samples,
                batch_size=batch_size,
                seed=seed,
                checkpoint_every=checkpoint_every,
            )
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc

        engine = make_engine(db_url or settings.resolved_database_url)
        try:
            factory = make_sessionmaker(engine, begin_immediate=True)
            # Rank 0 migrates and registers; the other ranks wait for it, then look up.
            failure: Exception | None = None
            try:
                if shard.is_main:
                    upgrade(engine)
                    slug, folder = _resolve_sae(factory, settings, sae, may_register=True)
            except (DatabaseError, _Usage) as exc:
                failure = exc
            if shard.distributed:
                from ..harvest import distributed

                distributed.init(shard, dev)
                if not distributed.all_ok(failure is None, shard, dev) and failure is None:
                    typer.echo("error: rank 0 could not prepare the harvest", err=True)
                    raise typer.Exit(1)
                if failure is None and not shard.is_main:
                    try:
                        slug, folder = _resolve_sae(factory, settings, sae, may_register=False)
                    except (DatabaseError, _Usage) as exc:
                        failure = exc
            if failure is not None:
                typer.echo(f"error: {failure}", err=True)
                raise typer.Exit(2 if isinstance(failure, _Usage) else 1) from failure

            from ..sae import load as load_sae

            try:
                model_sae = load_sae(folder, device=dev)
                model_name = model_sae.cfg.model_name
                if not model_name or not model_sae.cfg.hook_name:
                    raise _Usage(f"the SAE {slug!r} names no subject model or hook")
                model = load_model(model_name, device=dev, settings=settings)
                spec = load_corpus(corpus)
                n_contexts = max(1, tokens // ctx_len)
                contexts = make_contexts(spec, model, ctx_len, seed=seed, max_contexts=n_contexts)
            except (_Usage, SAEError, ModelNotFoundError, HookError, CorpusError) as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from exc
            if len(contexts) < n_contexts:
                say(
                    f"note: {spec.name!r} gives {len(contexts)} contexts of {ctx_len} tokens, "
                    f"fewer than the {n_contexts} asked for"
                )
            say(
                f"harvesting {slug}: {len(contexts) * ctx_len:,} tokens of {spec.name} "
                f"({len(contexts)} x {ctx_len}) on {dev}"
                + (f", {shard.world_size} processes" if shard.distributed else "")
            )
            try:
                out = harvest(
                    factory,
                    slug,
                    model_sae,
                    model,
                    contexts,
                    params,
                    corpus=spec,
                    work_dir=settings.data_dir / "harvests",
                    resume=not restart,
                    show_progress=shard.is_main,
                    shard=shard,
                )
            except (HarvestError, DatabaseError) as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from exc
            except KeyboardInterrupt:
                typer.echo(
                    "interrupted; run the same command again to resume from the last saved state",
                    err=True,
                )
                raise typer.Exit(130) from None
            if out.resumed_from:
                say(f"resumed after {out.resumed_from} contexts")
            if out.written is not None:
                w = out.written
                say(
                    f"harvest {out.harvest_id} complete in {out.seconds:.0f} s: {w.examples:,} "
                    f"examples, {w.contexts:,} contexts, {w.stats:,} unit stats"
                )
        finally:
            engine.dispose()


class _Usage(ValueError):
    pass


def _resolve_sae(
    factory: sessionmaker[Session], settings: Settings, ref: str, *, may_register: bool
) -> tuple[str, Path]:
    """``(slug, stored checkpoint folder)`` of a slug or a checkpoint path (registered
    when it is not yet and ``may_register``)."""
    from ..db.repositories import saes as sae_repo
    from ..services import tx
    from ..services.errors import Conflict, KronScopeError
    from ..services.sae_registry import UploadOptions, register_checkpoint, sae_folder

    path = Path(ref).expanduser()
    with factory() as session:
        if not path.exists():
            row = sae_repo.get_sae_by_slug(session, ref)
            if row is None:
                raise _Usage(f"{ref!r} is neither a registered SAE slug nor a checkpoint path")
            return row.slug, sae_folder(settings, row)
        from ..sae.checkpoint import load_checkpoint

        try:
            loaded = load_checkpoint(path)
        except Exception as exc:
            raise _Usage(f"{path}: not a usable checkpoint: {exc}") from exc
        row = sae_repo.get_sae_by_hash(session, loaded.sha256)
        if row is not None:
            return row.slug, sae_folder(settings, row)
        if not may_register:
            raise _Usage(f"{path} is not registered (rank 0 should have done it)")
        try:
            row, _warnings = register_checkpoint(session, settings, path, UploadOptions())
            tx.commit(session)
        except Conflict as exc:
            existing = (getattr(exc, "detail", None) or {}).get("existing_slug")
            if not existing:
                raise _Usage(str(exc)) from exc
            row = sae_repo.get_sae_by_slug(session, existing)
            assert row is not None
        except KronScopeError as exc:
            raise _Usage(getattr(exc, "message", str(exc))) from exc
        typer.echo(f"registered {path} as {row.slug!r}")
        return row.slug, sae_folder(settings, row)
