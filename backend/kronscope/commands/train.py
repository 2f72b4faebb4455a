"""``kronscope train``: train a KronSAE or TopK SAE on a subject model's activations.

Defaults follow the paper's recipe (``kronsae.md``, appendix A; see ``sae/train.py``).
Shapes are checked before any model is loaded. With ``--resume DIR`` every option not
given is taken from the checkpoint, and an option given with another value than the
checkpoint's is an error naming it. Exit codes: 0 done, 1 error, 130 interrupted (a
checkpoint was written; ``--resume`` continues it exactly).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import typer

DEFAULTS: dict[str, Any] = {
    "architecture": "kronsae",
    "d_sae": 32768,
    "m": 2,
    "n": 4,
    "k": 50,
    "composition": "mand",
    "corpus": "builtin",
    "ctx_len": 128,
    "lr": 8e-4,
    "batch_size": 8192,
    "k_aux": None,
    "dead_window": 10_000_000,
    "aux_coef": 1 / 32,
    "seed": 0,
    "b_dec_init": "zero",
    "buffer_tokens": 131_072,
    "lm_batch_size": 16,
}
_COUNT = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmgb]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


class UsageError(ValueError):
    """A bad command line (reported as one line, exit 1)."""


def parse_count(text: str, what: str) -> int:
    """``"125000"``, ``"125k"``, ``"1.5M"``, ``"2e6"`` -> int."""
    m = _COUNT.match(str(text))
    if not m:
        raise UsageError(f"{what}: cannot read {text!r} as a count (e.g. 100000, 500k, 2M, 1e6)")
    value = float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).lower()]
    if value != int(value) or value <= 0:
        raise UsageError(f"{what}: {text!r} is not a positive whole number")
    return int(value)


def parse_iso_flops(text: str) -> int:
    """``topk:T`` -> T."""
    arch, sep, count = text.partition(":")
    if not sep or arch.strip().lower() != "topk":
        raise UsageError(f"--iso-flops-of: expected topk:TOKENS (e.g. topk:1M), got {text!r}")
    return parse_count(count, "--iso-flops-of")


def _saved_options(path: Path) -> dict[str, Any]:
    """The options a checkpoint was trained with, read from its JSON files only."""
    from ..sae.train import read_trainer_state

    state = read_trainer_state(path)
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read cfg.json ({exc})") from exc
    meta = cfg.get("metadata") or {}
    training = meta.get("training") or {}
    tc = state.get("train_config") or {}
    data = training.get("data") or {}
    out = {
        "architecture": cfg.get("architecture"),
        "d_sae": cfg.get("d_sae"),
        "k": cfg.get("k"),
        "model": meta.get("model_name"),
        "hook": meta.get("hook_name"),
        "ctx_len": meta.get("context_size"),
        "corpus": (training.get("corpus") or {}).get("spec"),
        "tokens": tc.get("tokens"),
        "lr": tc.get("lr"),
        "batch_size": tc.get("batch_size"),
        "k_aux": tc.get("k_aux"),
        "dead_window": tc.get("dead_window"),
        "aux_coef": tc.get("aux_coef"),
        "seed": tc.get("seed"),
        "b_dec_init": tc.get("b_dec_init"),
        "checkpoint_every": tc.get("checkpoint_every"),
        "buffer_tokens": data.get("buffer_tokens"),
        "lm_batch_size": data.get("lm_batch_size"),
        "eval_tokens": training.get("eval_tokens"),
    }
    if cfg.get("architecture") == "kronsae":
        out.update(
            h=cfg.get("h"), m=cfg.get("m"), n=cfg.get("n"), composition=cfg.get("composition")
        )
    return out


def resolve_options(given: dict[str, Any]) -> dict[str, Any]:
    """Merge the command line with the resumed checkpoint's options and the defaults."""
    opts = dict(given)
    resume = opts.get("resume")
    if resume is not None:
        saved = _saved_options(Path(resume))
        for key, value in saved.items():
            mine = opts.get(key)
            if mine is None:
                opts[key] = value
            elif (
                value is not None
                and mine != value
                and not (
                    isinstance(value, float)
                    and isinstance(mine, int | float)
                    and float(mine) == value
                )
            ):
                flag = "--" + key.replace("_", "-")
                raise UsageError(
                    f"cannot resume from {resume}: {flag} is {mine!r} but the checkpoint was trained with {value!r}"
                )
        if opts.get("out") is None:
            opts["out"] = resume
    for key, value in DEFAULTS.items():
        if opts.get(key) is None:
            opts[key] = value
    if opts["architecture"] == "kronsae":
        h, m, n, d_sae = (
            opts.get("h"),
            opts["m"],
            opts["n"],
            given.get("d_sae") or opts.get("d_sae"),
        )
        if h is None:
            if d_sae % (m * n):
                raise UsageError(f"--d-sae {d_sae} is not a multiple of m*n = {m}*{n} = {m * n}")
            opts["h"] = d_sae // (m * n)
        elif given.get("d_sae") is None:
            opts["d_sae"] = h * m * n
    return opts


def sae_config(opts: dict[str, Any], d_in: int, metadata: dict[str, Any] | None = None):
    """The ``SAEConfig`` of the run (raises ``ConfigError`` on bad shapes)."""
    from ..sae import SAEConfig

    kw: dict[str, Any] = {
        "architecture": opts["architecture"],
        "d_in": d_in,
        "d_sae": opts["d_sae"],
        "k": opts["k"],
        "metadata": dict(metadata or {}),
    }
    if opts["architecture"] == "kronsae":
        kw.update(h=opts["h"], m=opts["m"], n=opts["n"], composition=opts["composition"])
        kw["apply_b_dec_to_input"] = False  # the paper: no subtraction
    else:
        kw["apply_b_dec_to_input"] = True  # Gao et al.'s pre-bias
    return SAEConfig(**kw)


def quiet_transformers() -> None:
    """No "Loading weights" bars from transformers: the command shows its own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(
        f"error: {str(message).strip().splitlines()[0] if str(message).strip() else message}",
        err=True,
    )
    return typer.Exit(code)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: str | None = typer.Option(
            None, "--model", help="Subject model: packaged name, folder or models-dir name."
        ),
        hook: str | None = typer.Option(
            None, "--hook", help="Module path (model.layers.12) or TransformerLens name."
        ),
        corpus: str | None = typer.Option(
            None, "--corpus", help="builtin (default), a .txt/.md/.jsonl file or a folder."
        ),
        ctx_len: int | None = typer.Option(
            None, "--ctx-len", help="Tokens per context (default 128)."
        ),
        tokens: str | None = typer.Option(
            None, "--tokens", help="Training tokens, e.g. 2M (steps = tokens // batch size)."
        ),
        architecture: str | None = typer.Option(
            None, "--architecture", help="kronsae (default) or topk."
        ),
        d_sae: int | None = typer.Option(
            None, "--d-sae", help="Dictionary size F (default 32768)."
        ),
        h: int | None = typer.Option(None, "--h", help="KronSAE heads (default F / (m*n))."),
        m: int | None = typer.Option(None, "--m", help="KronSAE base size (default 2)."),
        n: int | None = typer.Option(None, "--n", help="KronSAE extension size (default 4)."),
        k: int | None = typer.Option(None, "--k", help="Latents kept per token (default 50)."),
        composition: str | None = typer.Option(
            None, "--composition", help="mand (default), relu_product or product."
        ),
        lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default 8e-4)."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Tokens per step (default 8192)."
        ),
        k_aux: int | None = typer.Option(None, "--k-aux", help="AuxK latents (default d_in/2)."),
        dead_window: str | None = typer.Option(
            None, "--dead-window", help="Tokens without firing = dead (default 10M)."
        ),
        aux_coef: float | None = typer.Option(
            None, "--aux-coef", help="AuxK penalty (default 1/32)."
        ),
        b_dec_init: str | None = typer.Option(
            None, "--b-dec-init", help="zero (paper, default), mean or median of the first batch."
        ),
        seed: int | None = typer.Option(
            None, "--seed", help="Seeds initialisation and data order (default 0)."
        ),
        out: Path | None = typer.Option(
            None, "--out", help="Checkpoint folder (default: the --resume folder)."
        ),
        checkpoint_every: str | None = typer.Option(
            None, "--checkpoint-every", help="Checkpoint every N tokens."
        ),
        resume: Path | None = typer.Option(
            None, "--resume", help="Continue the run checkpointed in this folder."
        ),
        iso_flops_of: str | None = typer.Option(
            None,
            "--iso-flops-of",
            help="topk:T: the FLOPs a TopK SAE of equal F spends on T tokens (Eq. 7).",
        ),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        eval_tokens: str | None = typer.Option(
            None,
            "--eval-tokens",
            help="Held-out tokens for the final metrics (default 8192; 0: skip).",
        ),
        buffer_tokens: int | None = typer.Option(
            None, "--buffer-tokens", help="Tokens pooled and shuffled together (default 131072)."
        ),
        lm_batch_size: int | None = typer.Option(
            None, "--lm-batch-size", help="Contexts per subject-model forward pass (default 16)."
        ),
        progress: bool = typer.Option(
            True, "--progress/--no-progress", help="Show a progress bar."
        ),
    ) -> None:
        """Train a KronSAE (any h, m, n, composition) or a TopK SAE on a model's activations."""
        given = {
            "model": model, "hook": hook, "corpus": corpus, "ctx_len": ctx_len,
            "architecture": architecture, "d_sae": d_sae, "h": h, "m": m, "n": n, "k": k,
            "composition": composition, "lr": lr, "batch_size": batch_size, "k_aux": k_aux,
            "aux_coef": aux_coef, "b_dec_init": b_dec_init, "seed": seed, "out": out,
            "resume": resume, "buffer_tokens": buffer_tokens, "lm_batch_size": lm_batch_size,
        }  # fmt: skip
        try:
            given["tokens"] = parse_count(tokens, "--tokens") if tokens is not None else None
            given["dead_window"] = (
                parse_count(dead_window, "--dead-window") if dead_window else None
            )
            given["checkpoint_every"] = (
                parse_count(checkpoint_every, "--checkpoint-every") if checkpoint_every else None
            )
            given["eval_tokens"] = (
                (0 if eval_tokens.strip() == "0" else parse_count(eval_tokens, "--eval-tokens"))
                if eval_tokens is not None
                else None
            )
            iso = parse_iso_flops(iso_flops_of) if iso_flops_of is not None else None
            code = _train(given, iso, device, progress)
        except typer.Exit:
            raise
        except KeyboardInterrupt:  # before or after the training loop: nothing to save
            raise _fail("interrupted", 130) from None
        except Exception as exc:  # every failure is one line, no traceback
            raise _fail(str(exc) or type(exc).__name__) from None
        if code:
            raise typer.Exit(code)


def _train(given: dict[str, Any], iso: int | None, device: str | None, progress: bool) -> int:
    from ..sae.train import (
        TrainConfig,
        Trainer,
        TrainingError,
        iso_flops_tokens,
        new_sae,
        resume_trainer,
    )

    if iso is not None and given.get("tokens") is not None:
        raise UsageError("give either --tokens or --iso-flops-of, not both")
    opts = resolve_options(given)
    if opts["architecture"] not in ("kronsae", "topk"):
        raise UsageError(f"--architecture must be kronsae or topk, not {opts['architecture']!r}")
    if opts["architecture"] == "topk" and any(
        given.get(x) is not None for x in ("h", "m", "n", "composition")
    ):
        raise UsageError("--h, --m, --n and --composition apply to --architecture kronsae only")
    if iso is not None and opts["architecture"] != "kronsae":
        raise UsageError(
            "--iso-flops-of gives a KronSAE the FLOPs of a TopK SAE; use it with --architecture kronsae"
        )
    sae_config(opts, d_in=1)  # shapes (F = h*m*n, m <= n, k <= F) checked before any model loads
    for key, flag in (("model", "--model"), ("hook", "--hook"), ("out", "--out")):
        if opts.get(key) is None:
            raise UsageError(f"{flag} is required")
    if opts.get("tokens") is None and iso is None:
        raise UsageError("give the training length with --tokens (or --iso-flops-of topk:T)")
    probe = TrainConfig(
        tokens=opts["tokens"] or opts["batch_size"], batch_size=opts["batch_size"], lr=opts["lr"],
        aux_coef=opts["aux_coef"], k_aux=opts["k_aux"], dead_window=opts["dead_window"],
        b_dec_init=opts["b_dec_init"], seed=opts["seed"], checkpoint_every=opts["checkpoint_every"],
    )  # fmt: skip
    probe.validate()
    out = Path(opts["out"])
    if opts.get("resume") is None and out.exists() and any(out.iterdir()):
        raise UsageError(
            f"--out {out} exists and is not empty; choose another folder or --resume it"
        )

    from ..config import resolve_device
    from ..sae.activations import open_lm_data

    dev = resolve_device(device)
    quiet_transformers()
    data = open_lm_data(opts["model"], opts["hook"], opts["corpus"], opts["ctx_len"], device=dev)
    d_in = data.model.d_model
    if iso is not None:
        opts["tokens"] = iso_flops_tokens(iso, d_in, opts["h"], opts["m"], opts["n"], opts["k"])
        typer.echo(
            f"iso-FLOPs: a TopK SAE of F = {opts['d_sae']} on {iso:,} tokens spends the FLOPs this KronSAE "
            f"spends on {opts['tokens']:,} tokens (Eq. 7)"
        )
    source = data.train_source(
        opts["seed"],
        buffer_tokens=opts["buffer_tokens"],
        lm_batch_size=opts["lm_batch_size"],
        tokens=opts["tokens"],
    )
    available = source.available_tokens
    if available < opts["batch_size"]:
        raise TrainingError(
            f"corpus {opts['corpus']!r} gives {available:,} training tokens with {opts['model']} at ctx_len "
            f"{opts['ctx_len']} (special tokens and the held-out 5% excluded), fewer than one batch of "
            f"{opts['batch_size']:,}"
        )
    if opts["tokens"] > available:
        raise TrainingError(
            f"{opts['tokens']:,} training tokens were asked for but corpus {opts['corpus']!r} gives only "
            f"{available:,} with {opts['model']} at ctx_len {opts['ctx_len']}; data is never repeated, so "
            f"lower --tokens or use a larger corpus"
        )
    cfg = TrainConfig(
        tokens=opts["tokens"], batch_size=opts["batch_size"], lr=opts["lr"], aux_coef=opts["aux_coef"],
        k_aux=opts["k_aux"], dead_window=opts["dead_window"], b_dec_init=opts["b_dec_init"],
        seed=opts["seed"], checkpoint_every=opts["checkpoint_every"], device=dev,
    )  # fmt: skip
    eval_tokens = opts.get("eval_tokens")
    eval_tokens = 8192 if eval_tokens is None else eval_tokens
    data_info = {**data.info(), "eval_tokens": eval_tokens}

    def evaluator(sae: Any) -> dict[str, Any]:
        from ..sae.evaluate import evaluate_on_contexts

        result = evaluate_on_contexts(
            sae, data.model, data.contexts, data.hook, data.heldout_contexts(eval_tokens),
            progress=progress,
        )  # fmt: skip
        metrics = result.as_dict()
        metrics["split"] = "heldout"
        return metrics

    kwargs: dict[str, Any] = {
        "out": out,
        "data_info": data_info,
        "evaluator": evaluator if eval_tokens else None,
        "progress": progress,
    }
    if opts.get("resume") is not None:
        trainer = resume_trainer(opts["resume"], source, cfg, **kwargs)
        typer.echo(f"resuming at {trainer.tokens_seen:,} of {cfg.steps * cfg.batch_size:,} tokens")
    else:
        metadata = {
            "model_name": opts["model"],
            "hook_name": opts["hook"],
            "context_size": opts["ctx_len"],
            "prepend_bos": True,
        }
        sae = new_sae(sae_config(opts, d_in, metadata), seed=opts["seed"], device=dev)
        trainer = Trainer(sae, source, cfg, **kwargs)
    if cfg.batch_size * cfg.steps != cfg.tokens:
        typer.echo(
            f"training on {cfg.steps * cfg.batch_size:,} tokens ({cfg.steps} full batches of {cfg.batch_size:,})"
        )
    result = trainer.run()
    if result.interrupted:
        typer.echo(
            f"interrupted at {result.tokens_seen:,} tokens (step {result.steps}/{cfg.steps}); checkpoint saved "
            f"to {result.checkpoint}; continue with: kronscope train --resume {result.checkpoint}",
            err=True,
        )
        return 130
    m = result.metrics
    summary = ", ".join(
        f"{key} {m[key]:.4g}"
        for key in ("ev", "l0", "dead_fraction", "delta_lm_loss")
        if isinstance(m.get(key), float | int)
    )
    typer.echo(
        f"trained {result.tokens_seen:,} tokens in {result.seconds:.0f}s; {summary}; saved to {result.checkpoint}"
    )
    sys.stdout.flush()
    return 0
