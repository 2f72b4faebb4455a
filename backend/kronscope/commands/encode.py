"""``kronscope encode CHECKPOINT TEXT``: the top latents of an SAE on each token of a text.

The subject model and hook default to the checkpoint's ``metadata.model_name`` and
``metadata.hook_name``; ``--model`` also accepts a folder path. Tokens are shown with
``repr`` so spaces, newlines and control characters are visible. For KronSAE each latent
also shows its ``(head, base, extension)`` coordinates. Every failure (missing model,
unknown hook, an SAE whose d_in does not match the model) is one line on stderr and exit
status 1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

TOKEN_WIDTH = 24
"""Longest token column shown; longer token reprs are cut with an ellipsis."""


@dataclass
class TokenLatents:
    position: int
    token: str
    special: bool
    latents: list[tuple[int, float, tuple[int, int, int] | None]] = field(default_factory=list)
    """``(latent, value, (head, base, extension) or None)``, largest value first."""


@dataclass
class EncodeResult:
    architecture: str
    d_in: int
    d_sae: int
    model: str
    hook: str
    tokens: list[TokenLatents]
    kron: dict[str, int] | None = None


class EncodeError(Exception):
    """A usage problem that is reported as one line."""


def encode_text(
    checkpoint: Path,
    text: str,
    *,
    model_name: str | None = None,
    hook: str | None = None,
    top: int = 5,
    device: str | None = None,
) -> EncodeResult:
    """Load the SAE and its subject model, run the text to the hook, and encode each token."""
    import torch

    from .. import sae as sae_lib
    from ..lm import load_model

    if top < 1:
        raise EncodeError(f"--top must be at least 1, got {top}")
    sae = sae_lib.load(checkpoint)
    cfg = sae.cfg
    model_name = model_name or cfg.model_name
    hook = hook or cfg.hook_name
    if not model_name:
        raise EncodeError(
            f"{checkpoint}: the checkpoint names no model (metadata.model_name); pass --model"
        )
    if not hook:
        raise EncodeError(
            f"{checkpoint}: the checkpoint names no hook (metadata.hook_name); pass --hook"
        )
    _note_slow_first_load(model_name)
    subject = load_model(model_name, device=device or "auto", allow_paths=True)
    subject.resolve_hook(hook)
    batch = subject.tokenize([text], prepend_bos=bool(cfg.metadata.get("prepend_bos", True)))
    if batch.input_ids.shape[1] == 0:
        raise EncodeError("the text gives no tokens")
    acts = subject.activations(batch.input_ids, batch.attention_mask, hook)[0]  # [T, d]
    if acts.shape[-1] != sae.d_in:
        raise EncodeError(
            f"the SAE reads activations of width d_in = {sae.d_in}, but model {model_name!r} gives "
            f"width {acts.shape[-1]} at hook {hook!r}"
        )
    sae = sae.to(acts.device)
    with torch.no_grad():
        values, indices = sae.top_latents(acts, top)
    coordinates = getattr(sae, "coordinates", None)
    rows = []
    for t, token in enumerate(batch.tokens[0]):
        row = TokenLatents(t, token, bool(batch.special_mask[0, t]))
        for v, i in zip(values[t].tolist(), indices[t].tolist(), strict=True):
            if v > 0:
                row.latents.append((int(i), float(v), coordinates(i) if coordinates else None))
        rows.append(row)
    kron = (
        {"h": cfg.h, "m": cfg.m, "n": cfg.n, "k": cfg.k} if cfg.architecture == "kronsae" else None
    )
    return EncodeResult(cfg.architecture, sae.d_in, sae.d_sae, subject.name, hook, rows, kron)  # type: ignore[arg-type]


def shown_token(token: str) -> str:
    """The token's ``repr`` (spaces and control characters visible), cut to TOKEN_WIDTH."""
    r = repr(token)
    return r if len(r) <= TOKEN_WIDTH else r[: TOKEN_WIDTH - 1] + "…"


def render(result: EncodeResult) -> list[str]:
    sizes = f"d_in {result.d_in}, d_sae {result.d_sae}"
    if result.kron:
        sizes += ", " + ", ".join(f"{k} {v}" for k, v in result.kron.items())
    lines = [f"SAE {result.architecture} ({sizes}) on model {result.model} at {result.hook}"]
    legend = "latent=value" + (" (head, base, extension)" if result.kron else "")
    width = max([len(shown_token(r.token)) for r in result.tokens] + [5])
    pos_w = max(3, len(str(len(result.tokens) - 1)))
    lines.append(f"{'pos':>{pos_w}}  {'token':<{width}}   top latents: {legend}")
    for row in result.tokens:
        parts = []
        for index, value, coords in row.latents:
            part = f"{index}={value:.4g}"
            if coords is not None:
                part += f" ({coords[0]}, {coords[1]}, {coords[2]})"
            parts.append(part)
        mark = "*" if row.special else " "
        shown = "   ".join(parts) if parts else "(none active)"
        lines.append(f"{row.position:>{pos_w}}  {shown_token(row.token):<{width}} {mark} {shown}")
    if any(r.special for r in result.tokens):
        lines.append("* special token (BOS/EOS/CLS/SEP)")
    return lines


def as_json(result: EncodeResult) -> dict[str, Any]:
    return {
        "architecture": result.architecture,
        "d_in": result.d_in,
        "d_sae": result.d_sae,
        "model": result.model,
        "hook": result.hook,
        "kronsae": result.kron,
        "tokens": [
            {
                "position": r.position,
                "token": r.token,
                "special": r.special,
                "latents": [
                    {
                        "latent": i,
                        "value": v,
                        **({"head": c[0], "base": c[1], "extension": c[2]} if c else {}),
                    }
                    for i, v, c in r.latents
                ],
            }
            for r in result.tokens
        ],
    }


def _one_line(exc: BaseException) -> str:
    from ..lm import CorpusError, HookError, ModelNotFoundError
    from ..sae import SAEError

    message = " ".join(str(exc).split()) or type(exc).__name__
    known = (EncodeError, ModelNotFoundError, HookError, CorpusError, SAEError, FileNotFoundError)
    if isinstance(exc, KeyError) and exc.args:  # str(KeyError) is just the quoted key
        message = str(exc.args[0])
    if not isinstance(exc, known):
        message = f"{type(exc).__name__}: {message}"
    return message


def _quiet_transformers() -> None:
    """No progress bars or warnings from transformers: stderr is kept for our one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _note_slow_first_load(model_name: str) -> None:
    from ..config import get_settings
    from ..lm import ModelNotFoundError, resolve_model
    from ..lm.model import CACHE_MARKER, gguf_cache_path

    settings = get_settings()
    try:
        source = resolve_model(model_name, settings, allow_paths=True)
    except ModelNotFoundError:
        return  # reported by load_model
    if source.kind == "gguf" and not (gguf_cache_path(source, settings) / CACHE_MARKER).is_file():
        typer.echo(
            f"note: first use of {model_name}: dequantising its GGUF file (about 30 s)", err=True
        )


def register(app: typer.Typer) -> None:
    @app.command("encode")
    def encode_cmd(
        checkpoint: Path = typer.Argument(..., help="SAE checkpoint folder or archive."),
        text: str = typer.Argument(..., help="Text to encode ('-' reads standard input)."),
        model: str | None = typer.Option(
            None, "--model", help="Subject model name or folder (default: the checkpoint's)."
        ),
        hook: str | None = typer.Option(
            None, "--hook", help="Hook name (default: the checkpoint's)."
        ),
        top: int = typer.Option(5, "--top", help="Latents shown per token."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        json_out: bool = typer.Option(
            False, "--json", help="Print one JSON object instead of a table."
        ),
    ) -> None:
        """Show the top latents of an SAE on every token of TEXT."""
        _quiet_transformers()
        try:
            if text == "-":
                text = sys.stdin.read()
            result = encode_text(
                checkpoint, text, model_name=model, hook=hook, top=top, device=device
            )
        except typer.Exit:
            raise
        except Exception as exc:  # every failure is one line, no traceback
            typer.echo(f"error: {_one_line(exc)}", err=True)
            raise typer.Exit(1) from None
        if json_out:
            typer.echo(json.dumps(as_json(result), ensure_ascii=False))
            return
        for line in render(result):
            typer.echo(line)
