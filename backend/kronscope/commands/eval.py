"""``kronscope eval CHECKPOINT``: reconstruction, sparsity and LM-loss metrics on held-out
contexts (the last 5% of ``make_contexts(seed=0)``, never read by ``kronscope train``).

Model, hook, context length and corpus default to what the checkpoint's ``cfg.json``
records (``metadata.model_name``, ``hook_name``, ``context_size``,
``training.corpus.spec``); any checkpoint ``kronscope.sae.load`` reads works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from .train import UsageError, _fail, parse_count, quiet_transformers

_LABELS = (
    ("ev", "explained variance"),
    ("fvu", "fraction of variance unexplained"),
    ("mse", "MSE per element"),
    ("l0", "L0 (active latents per token)"),
    ("dead_fraction", "dead fraction (never fired)"),
    ("dense_fraction", "dense fraction"),
    ("lm_loss_clean", "LM loss, clean"),
    ("lm_loss_spliced", "LM loss, SAE spliced in"),
    ("lm_loss_zero", "LM loss, zero-ablated"),
    ("delta_lm_loss", "delta LM loss (spliced - clean)"),
    ("loss_recovered", "fraction of loss recovered"),
)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        checkpoint: Path = typer.Argument(
            ..., help="Checkpoint folder or archive (any format kronscope reads)."
        ),
        model: str | None = typer.Option(
            None, "--model", help="Subject model (default: the checkpoint's)."
        ),
        hook: str | None = typer.Option(None, "--hook", help="Hook (default: the checkpoint's)."),
        corpus: str | None = typer.Option(
            None, "--corpus", help="Corpus (default: the training corpus, else builtin)."
        ),
        tokens: str = typer.Option(
            "8192", "--tokens", help="Held-out tokens to measure (at most the held-out split)."
        ),
        ctx_len: int | None = typer.Option(
            None, "--ctx-len", help="Tokens per context (default: the checkpoint's, else 128)."
        ),
        batch_size: int = typer.Option(8, "--batch-size", help="Contexts per forward pass."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        lm_loss: bool = typer.Option(
            True, "--lm-loss/--no-lm-loss", help="Measure LM loss with the SAE spliced in."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
    ) -> None:
        """Evaluate an SAE on held-out contexts: EV, FVU, MSE, L0, dead/dense fractions, LM loss."""
        try:
            result = _evaluate(checkpoint, model, hook, corpus, parse_count(tokens, "--tokens"), ctx_len,
                               batch_size, device, lm_loss, progress=not as_json)  # fmt: skip
        except typer.Exit:
            raise
        except Exception as exc:  # every failure is one line, no traceback
            raise _fail(str(exc) or type(exc).__name__) from None
        if as_json:
            typer.echo(json.dumps(result))
            return
        typer.echo(
            f"{result['architecture']} d_sae={result['d_sae']} on {result['model']} {result['hook']}, "
            f"{result['tokens']:,} held-out tokens of corpus {result['corpus']!r}"
        )
        for key, label in _LABELS:
            if key in result:
                value = result[key]
                shown = "n/a" if value is None else f"{value:.6g}"
                extra = (
                    f" (latents firing on > {result['dense_threshold']:.0%} of tokens)"
                    if key == "dense_fraction"
                    else ""
                )
                typer.echo(f"  {label:<34} {shown}{extra}")


def _evaluate(
    checkpoint: Path,
    model: str | None,
    hook: str | None,
    corpus: str | None,
    tokens: int,
    ctx_len: int | None,
    batch_size: int,
    device: str | None,
    lm_loss: bool,
    progress: bool,
) -> dict[str, Any]:
    from ..config import resolve_device
    from ..sae import load
    from ..sae.activations import open_lm_data
    from ..sae.evaluate import evaluate_on_contexts

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    sae = load(checkpoint, device=dev)
    quiet_transformers()
    meta = sae.cfg.metadata
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    model = model or sae.cfg.model_name
    hook = hook or sae.cfg.hook_name
    if not model:
        raise UsageError("the checkpoint names no subject model; pass --model")
    if not hook:
        raise UsageError("the checkpoint names no hook; pass --hook")
    corpus_spec = corpus or (training.get("corpus") or {}).get("spec") or "builtin"
    ctx = ctx_len or meta.get("context_size") or 128
    data = open_lm_data(model, hook, corpus_spec, int(ctx), device=dev)
    if data.model.d_model != sae.d_in:
        raise UsageError(
            f"the SAE reads d_in = {sae.d_in} but {model} has d_model = {data.model.d_model} at {hook}"
        )
    indices = data.heldout_contexts(tokens)
    result = evaluate_on_contexts(
        sae,
        data.model,
        data.contexts,
        hook,
        indices,
        batch_size=batch_size,
        lm_loss=lm_loss,
        progress=progress,
    )
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "architecture": sae.cfg.architecture,
        "d_sae": sae.d_sae,
        "model": model,
        "hook": hook,
        "corpus": corpus_spec,
        "ctx_len": int(ctx),
        "heldout_contexts": len(indices),
        **result.as_dict(),
    }
    return out
