"""``kronscope demo``: train a KronSAE on SmolLM2, harvest and explain it, serve the dashboard.

The stages (``services/demo.py``) are the real code paths and each is reused when its
result exists, so a second run goes straight to serving. Each stage prints what it does
and how long it took. Ctrl-C stops cleanly at any point: training writes a checkpoint
that the next run resumes, a harvest job goes back to the queue, explanations write
nothing half-done, and the server shuts down. Exit codes: 0 done, 1 error, 130
interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Any

import typer

from ..services.demo import DemoConfig

_D = DemoConfig()
STAGES = 6


def _count(text: str, what: str) -> int:
    from .train import UsageError, parse_count

    try:
        return parse_count(text, what)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


def check_port(host: str, port: int) -> None:
    """Fail now, not after minutes of training, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = "it is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise typer.BadParameter(
                f"cannot listen on {host}:{port} ({why}); choose another with --port",
                param_hint="--port",
            ) from None


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface the dashboard listens on."),
        port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port of the dashboard."),
        serve: bool = typer.Option(
            True, "--serve/--no-serve", help="Serve the dashboard at the end (default) or stop."
        ),
        train_tokens: str = typer.Option(
            f"{_D.train_tokens}", "--train-tokens", help="Training tokens (e.g. 96k, 1M)."
        ),
        harvest_tokens: str = typer.Option(
            f"{_D.harvest_tokens}", "--harvest-tokens", help="Tokens the harvest reads (e.g. 32k)."
        ),
        eval_tokens: int = typer.Option(
            _D.eval_tokens, "--eval-tokens", min=0, help="Held-out tokens for metrics (0: skip)."
        ),
        model: str = typer.Option(
            _D.model,
            "--model",
            help="Subject model (packaged name or KRONSCOPE_MODELS_DIR folder).",
        ),
        hook: str = typer.Option(_D.hook, "--hook", help="Module whose output the SAE reads."),
        corpus: str = typer.Option(
            _D.corpus, "--corpus", help="builtin, or a file/folder name in DATA_DIR/corpora."
        ),
        d_sae: int = typer.Option(_D.d_sae, "--d-sae", min=1, help="Latents F (= h*m*n)."),
        m: int = typer.Option(_D.m, "--m", min=1, help="KronSAE base size."),
        n: int = typer.Option(_D.n, "--n", min=1, help="KronSAE extension size."),
        k: int = typer.Option(_D.k, "--k", min=1, help="Active latents per token."),
        ctx_len: int = typer.Option(
            _D.ctx_len, "--ctx-len", min=2, help="Tokens per training context."
        ),
        batch_size: int = typer.Option(
            _D.batch_size, "--batch-size", min=1, help="Tokens per training step."
        ),
        harvest_ctx_len: int = typer.Option(
            _D.harvest_ctx_len, "--harvest-ctx-len", min=2, help="Tokens per harvest context."
        ),
        units: str = typer.Option(
            _D.explain_units, "--explain-units", help="Explain latents, parents or all."
        ),
        device: str = typer.Option(_D.device, "--device", help="auto, cpu, cuda or cuda:N."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    ) -> None:
        """Train a KronSAE on SmolLM2 (layer 12), harvest and explain it, and serve the
        dashboard with an admin API key. Every finished stage is reused on the next run."""
        from ..services.demo import DemoError

        cfg = DemoConfig(
            model=model,
            hook=hook,
            corpus=corpus,
            d_sae=d_sae,
            m=m,
            n=n,
            k=k,
            ctx_len=ctx_len,
            train_tokens=_count(train_tokens, "--train-tokens"),
            batch_size=batch_size,
            eval_tokens=eval_tokens,
            harvest_tokens=_count(harvest_tokens, "--harvest-tokens"),
            harvest_ctx_len=harvest_ctx_len,
            explain_units=units,
            device=device,
        )
        try:
            cfg.check()
        except DemoError as exc:
            raise typer.BadParameter(str(exc)) from None
        if serve:
            check_port(host, port)
        code = _run(cfg, host, port, serve, progress)
        if code:
            raise typer.Exit(code)


def _say(text: str) -> None:
    typer.echo(f"      {text}")


def _run(cfg: DemoConfig, host: str, port: int, serve: bool, progress: bool) -> int:
    from ..config import get_settings
    from ..services import demo as svc
    from ..services.errors import KronScopeError
    from .train import quiet_transformers

    quiet_transformers()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    total = svc.Stopwatch().__enter__()
    typer.echo(f"KronScope demo: data in {settings.data_dir}")
    stage = "prepare"
    try:
        from ..db import make_engine, make_sessionmaker, upgrade

        engine = make_engine(settings.resolved_database_url)
        try:
            upgrade(engine)
            factory = make_sessionmaker(engine, begin_immediate=True)

            stage = "train"
            _head(1, f"train: {cfg.describe()}")
            with svc.Stopwatch() as t:
                trained = svc.train_stage(settings, cfg, _say, progress=progress)
            verb = "reused" if trained.reused else "trained"
            line = svc.metrics_line(trained.metrics)
            _done(t, f"{verb} {trained.checkpoint}" + (f"; {line}" if line else ""))

            stage = "register"
            _head(2, "register the checkpoint in the database (the upload's service)")
            with svc.Stopwatch() as t:
                reg = svc.register_stage(factory, settings, trained.checkpoint, _say)
            for w in reg.warnings:
                _say(f"warning: {w}")
            _done(t, f"{'reused' if reg.reused else 'registered'} SAE {reg.slug!r}")

            stage = "harvest"
            _head(
                3,
                f"harvest: top and sampled examples of every latent and parent over "
                f"{cfg.harvest_tokens:,} tokens of {cfg.corpus}",
            )
            with svc.Stopwatch() as t:
                har = svc.harvest_stage(factory, settings, cfg, reg.sae_id, _say, progress=progress)
            _done(
                t,
                f"{'reused' if har.reused else 'wrote'} harvest {har.harvest_id} ({har.tokens:,} tokens)",
            )

            stage = "explain"
            _head(4, f"explain {cfg.explain_units} (heuristic explanations from the examples)")
            with svc.Stopwatch() as t:
                ex = svc.explain_stage(factory, settings, cfg, reg.sae_id, _say, progress=progress)
            _done(t, ex.message)

            stage = "key"
            _head(5, "create an admin API key (every scope)")
            with svc.Stopwatch() as t:
                key = svc.key_stage(factory)
            if key.earlier:
                ids = ", ".join(str(i) for i in key.earlier)
                _say(
                    f"earlier demo keys exist (ids {ids}); keys are stored hashed, so they cannot be "
                    "shown again: this is a new one (revoke old ones with `kronscope keys revoke ID`)"
                )
            _done(t, f"key {key.key_id} created")
        finally:
            engine.dispose()
    except svc.DemoInterrupted as exc:
        typer.echo(f"\ninterrupted during {stage}: {exc}", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted during {stage}; finished stages are kept", err=True)
        return 130
    except (svc.DemoError, KronScopeError) as exc:
        typer.echo(f"error during {stage}: {exc}", err=True)
        return 1
    except Exception as exc:  # model, corpus, database: one line, no traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        typer.echo(f"error during {stage}: {type(exc).__name__}: {message}", err=True)
        return 1
    total.__exit__()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    typer.echo("")
    typer.echo(f"stages done in {total.shown}")
    typer.echo(f"  SAE      {reg.slug}")
    typer.echo(f"  API key  {key.key}   (shown once; send as 'Authorization: Bearer <key>')")
    if not serve:
        typer.echo(f"  serve it with: kronscope serve --host {host} --port {port}")
        return 0
    _head(6, f"serve the dashboard on {url}  (Ctrl-C stops)")
    typer.echo(f"  dashboard  {url}/saes/{reg.slug}")
    typer.echo(f"  API        {url}/api/v1/saes   docs {url}/docs")
    typer.echo(f"  key        paste it at {url}/key to upload and edit from the browser")
    return _serve(settings, host, port)


def _head(n: int, text: str) -> None:
    typer.echo(f"[{n}/{STAGES}] {text}")


def _done(t: Any, text: str) -> None:
    typer.echo(f"      done in {t.shown}: {text}")


def _serve(settings: Any, host: str, port: int) -> int:
    import uvicorn

    from ..app import create_app

    # uvicorn stops on Ctrl-C by itself, then raises the signal again: that ends here
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)
    typer.echo("dashboard stopped")
    return 0
