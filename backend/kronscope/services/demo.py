"""The demo pipeline behind ``kronscope demo``: train -> register -> harvest -> explain -> key.

Every stage is the real code path, and every stage is reused when its result exists:

- **train**: a KronSAE on one layer of the subject model (``sae.train``, the trainer
  ``kronscope train`` uses, with held-out metrics from ``sae.evaluate``). The checkpoint
  lives in ``data_dir/demo/<run>/checkpoint``, where ``<run>`` names every setting that
  changes the result, so other settings train a new SAE beside the old one. A checkpoint
  whose ``metadata.training`` says all its tokens were seen is finished and reused; an
  interrupted one (Ctrl-C writes one; so does every ``checkpoint_every``) is resumed
  exactly; one that cannot be resumed (other code, other corpus) is trained anew.
- **register**: ``sae_registry.register_checkpoint``, the upload's own service (validation,
  native copy under ``data_dir/saes``, one row). The same weights already registered
  (same content hash) are reused.
- **harvest**: the harvest engine's pass (``harvest.runner.harvest``, what harvest jobs
  and ``kronscope harvest`` run) over the first contexts of the corpus, written in one
  transaction. An SAE with an active (complete) harvest is not harvested again; an
  interrupted pass resumes from the state it saved.
- **explain**: heuristic explanations of latents and parents (``explanations.generate``,
  as ``kronscope explain``). It writes everything in one transaction, so any heuristic
  explanation of the SAE means the stage is done.
- **key**: a new API key with every scope. Keys are stored hashed, so an earlier one can
  never be shown again: each run creates one and says how many earlier ones exist.

Serving is the command's part (``commands/demo.py``). This module prints nothing itself:
stages report through ``say`` and show tqdm progress bars on stderr.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ..config import Settings

DEMO_DIR = "demo"
KEY_NAME = "demo admin"
AUTHOR = "kronscope demo"
BUFFER_TOKENS = 16_384
"""Training activations computed and shuffled together."""

Say = Callable[[str], None]


class DemoError(Exception):
    """A stage cannot go on; the message says why in plain words."""


class DemoInterrupted(Exception):
    """Ctrl-C: the stage stopped cleanly; the message says what was kept."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains and harvests. Defaults: SmolLM2-135M, layer 12 of 30 (d = 576),
    F = 4096 latents as h = 512 heads of m x n = 2 x 4, k = 32."""

    model: str = "smollm2-135m"
    """Subject model (a packaged name or a sub-folder of KRONSCOPE_MODELS_DIR)."""
    hook: str = "model.layers.12"
    """Where activations are read: the residual stream after this decoder layer."""
    corpus: str = "builtin"
    """``builtin`` or the name of a file or folder in ``data_dir/corpora``."""
    d_sae: int = 4096
    m: int = 2
    n: int = 4
    k: int = 32
    ctx_len: int = 128
    """Tokens per training context."""
    train_tokens: int = 98_304
    """Training tokens (``train_tokens // batch_size`` steps)."""
    batch_size: int = 1024
    """Tokens per step: 1,024, not the paper's 8,192, so a CPU-sized run has ~100 steps."""
    lr: float = 4e-3
    """Peak learning rate. The paper's 8e-4 suits runs of thousands of steps; over ~100
    steps 4e-3 reaches a far better fit (on 56k tokens of layer 12: explained variance
    0.78 against 0.25 at 8e-4; 8e-3 gave 0.81 with more dead latents)."""
    dead_window: int = 10_000_000
    """Tokens without firing after which a latent is dead (the paper's 10M, so AuxK stays
    off in so short a run: a shorter window cost 30% more time for no better fit)."""
    eval_tokens: int = 1024
    """Held-out tokens for the final metrics (with LM loss: three passes of the whole
    model, the costly part); 0 skips them."""
    harvest_tokens: int = 32_768
    harvest_ctx_len: int = 64
    examples_per_latent: int = 20
    samples_per_latent: int = 20
    explain_units: str = "all"
    """``latents``, ``parents`` or ``all``."""
    seed: int = 0
    device: str = "auto"

    @property
    def h(self) -> int:
        return self.d_sae // (self.m * self.n)

    def check(self) -> None:
        if self.m < 1 or self.n < 1 or self.d_sae % (self.m * self.n):
            raise DemoError(
                f"d_sae {self.d_sae} must be a multiple of m*n = {self.m}*{self.n} = {self.m * self.n}"
            )
        if not 1 <= self.k <= self.d_sae:
            raise DemoError(f"k must be between 1 and d_sae = {self.d_sae}, got {self.k}")
        if self.train_tokens < self.batch_size:
            raise DemoError(
                f"{self.train_tokens:,} training tokens are fewer than one batch of {self.batch_size:,}"
            )
        if self.harvest_tokens < self.harvest_ctx_len:
            raise DemoError(
                f"{self.harvest_tokens:,} harvest tokens are fewer than one context of {self.harvest_ctx_len}"
            )
        if self.explain_units not in ("latents", "parents", "all"):
            raise DemoError(
                f"explain units are latents, parents or all, not {self.explain_units!r}"
            )

    @property
    def run_name(self) -> str:
        """A folder name holding every setting that changes the trained weights."""
        parts = [
            _safe(self.model),
            _safe(self.hook),
            self.corpus and _safe(self.corpus),
            f"kronsae-F{self.d_sae}-m{self.m}-n{self.n}-k{self.k}",
            f"ctx{self.ctx_len}-t{self.train_tokens}-b{self.batch_size}",
            f"lr{self.lr:g}-dw{self.dead_window}-s{self.seed}",
        ]
        return "-".join(p for p in parts if p)

    def describe(self) -> str:
        return (
            f"KronSAE F={self.d_sae} (h={self.h}, m={self.m}, n={self.n}), k={self.k}, on "
            f"{self.model} at {self.hook}, corpus {self.corpus}: {self.train_tokens:,} tokens "
            f"in {self.train_tokens // self.batch_size} steps of {self.batch_size:,}, lr {self.lr:g}"
        )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.").lower()


def demo_dir(settings: Settings) -> Path:
    return settings.data_dir / DEMO_DIR


def checkpoint_dir(settings: Settings, cfg: DemoConfig) -> Path:
    return demo_dir(settings) / cfg.run_name / "checkpoint"


# -- results -----------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    checkpoint: Path
    reused: bool
    resumed_from: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegisterOutcome:
    sae_id: int
    slug: str
    reused: bool
    warnings: list[str] = field(default_factory=list)


@dataclass
class HarvestOutcome:
    harvest_id: int
    reused: bool
    tokens: int
    message: str | None = None


@dataclass
class ExplainOutcome:
    reused: bool
    message: str
    written: int = 0


@dataclass
class KeyOutcome:
    key: str
    key_id: int
    earlier: list[int]
    """Ids of earlier (live) demo keys."""


# -- stage 1: train ----------------------------------------------------------------------------
def checkpoint_state(folder: Path) -> tuple[str, int, int]:
    """``(state, tokens_seen, total_tokens)`` of a demo checkpoint folder, from its JSON only;
    state is ``none``, ``finished``, ``partial`` or ``broken``."""
    if not folder.exists():
        return "none", 0, 0
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        training = cfg["metadata"]["training"]
        seen, total = int(training["tokens_seen"]), int(training["total_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return "broken", 0, 0
    if total > 0 and seen >= total:
        return "finished", seen, total
    return "partial", seen, total


def train_stage(
    settings: Settings,
    cfg: DemoConfig,
    say: Say,
    *,
    progress: bool = True,
    callbacks: list[Callable[[Any, Any], None]] | None = None,
) -> TrainOutcome:
    """Train (or reuse, or resume) the demo KronSAE; returns its checkpoint folder.
    ``callbacks`` go to the ``Trainer`` (run after every step)."""
    from ..config import resolve_device
    from ..sae import SAEConfig
    from ..sae.activations import open_lm_data
    from ..sae.train import (
        TrainConfig,
        Trainer,
        TrainingError,
        new_sae,
        read_trainer_state,
        resume_trainer,
    )
    from .harvest_jobs import resolve_corpus

    folder = checkpoint_dir(settings, cfg)
    state, seen, _ = checkpoint_state(folder)
    if state == "finished":
        say(f"reusing the finished checkpoint {folder} ({seen:,} tokens)")
        return TrainOutcome(folder, reused=True, metrics=_saved_metrics(folder))
    resumable = False
    if state == "partial":
        try:
            read_trainer_state(folder)
            resumable = True
        except TrainingError as exc:
            say(f"the interrupted checkpoint cannot be resumed ({exc}); training anew")
    if state == "broken" or (state == "partial" and not resumable):
        if state == "broken":
            say(f"{folder} holds no readable checkpoint; training anew")
        shutil.rmtree(folder)

    dev = resolve_device(cfg.device)
    say(f"loading {cfg.model} and the {cfg.corpus} corpus on {dev}")
    if _first_gguf_use(settings, cfg.model):
        say(
            f"first use of {cfg.model}: dequantising its GGUF file once (cached in {settings.cache_dir})"
        )
    corpus_spec = str(resolve_corpus(settings, cfg.corpus))
    data = open_lm_data(
        cfg.model, cfg.hook, corpus_spec, cfg.ctx_len, device=dev, allow_paths=False
    )
    # Small buffers: the bar moves (and Ctrl-C answers) every 16 steps, not after the
    # subject model has run over the whole run's tokens.
    source = data.train_source(
        cfg.seed, buffer_tokens=min(BUFFER_TOKENS, cfg.train_tokens), tokens=cfg.train_tokens
    )
    if source.available_tokens < cfg.train_tokens:
        raise DemoError(
            f"the {cfg.corpus} corpus gives {source.available_tokens:,} training tokens at "
            f"ctx_len {cfg.ctx_len}, fewer than the {cfg.train_tokens:,} asked for"
        )
    tc = TrainConfig(
        tokens=cfg.train_tokens,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        dead_window=cfg.dead_window,
        seed=cfg.seed,
        checkpoint_every=max(cfg.batch_size, cfg.train_tokens // 4),
        device=dev,
    )

    def evaluator(sae: Any) -> dict[str, Any]:
        from ..sae.evaluate import evaluate_on_contexts

        say(
            f"measuring on {cfg.eval_tokens:,} held-out tokens, then the LM loss clean, with "
            "the SAE spliced in and zero-ablated (three passes of the whole model)"
        )
        result = evaluate_on_contexts(
            sae,
            data.model,
            data.contexts,
            data.hook,
            data.heldout_contexts(cfg.eval_tokens),
            progress=progress,
        )
        metrics = result.as_dict()
        metrics["split"] = "heldout"
        return metrics

    kwargs: dict[str, Any] = {
        "out": folder,
        "data_info": {**data.info(), "eval_tokens": cfg.eval_tokens},
        "evaluator": evaluator if cfg.eval_tokens > 0 else None,
        "progress": progress,
        "callbacks": callbacks,
    }
    resumed_from = 0
    trainer: Trainer | None = None
    if resumable:
        try:
            trainer = resume_trainer(folder, source, tc, **kwargs)
            resumed_from = trainer.tokens_seen
            say(f"resuming the interrupted run at {resumed_from:,} of {tc.tokens:,} tokens")
        except TrainingError as exc:
            say(f"the interrupted checkpoint cannot be resumed ({exc}); training anew")
            shutil.rmtree(folder)
    if trainer is None:
        metadata = {
            "model_name": cfg.model,
            "hook_name": cfg.hook,
            "context_size": cfg.ctx_len,
            "prepend_bos": True,
            "demo": True,
        }
        sae_cfg = SAEConfig(
            architecture="kronsae",
            d_in=data.model.d_model,
            d_sae=cfg.d_sae,
            k=cfg.k,
            h=cfg.h,
            m=cfg.m,
            n=cfg.n,
            composition="mand",
            apply_b_dec_to_input=False,  # the paper: no pre-bias subtraction
            metadata=metadata,
        )
        trainer = Trainer(new_sae(sae_cfg, seed=cfg.seed, device=dev), source, tc, **kwargs)
    say("Ctrl-C stops after the current step and keeps a checkpoint that the next run resumes")
    result = trainer.run()
    if result.interrupted:
        raise DemoInterrupted(
            f"training stopped at {result.tokens_seen:,} of {tc.tokens:,} tokens; the checkpoint "
            f"{result.checkpoint} is kept and the next run resumes it"
        )
    return TrainOutcome(folder, reused=False, resumed_from=resumed_from, metrics=result.metrics)


def _first_gguf_use(settings: Settings, model: str) -> bool:
    from ..lm import ModelNotFoundError, resolve_model
    from ..lm.model import CACHE_MARKER, gguf_cache_path

    try:
        source = resolve_model(model, settings)
    except ModelNotFoundError:
        return False  # load_model reports it
    if source.kind != "gguf":
        return False
    return not (gguf_cache_path(source, settings) / CACHE_MARKER).is_file()


def _saved_metrics(folder: Path) -> dict[str, Any]:
    try:
        metrics = json.loads((folder / "cfg.json").read_text())["metadata"].get("metrics")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def metrics_line(metrics: dict[str, Any]) -> str:
    names = (
        ("ev", "explained variance"),
        ("l0", "L0"),
        ("delta_lm_loss", "delta LM loss"),
        ("loss_recovered", "loss recovered"),
    )
    parts = [
        f"{label} {metrics[key]:.3g}"
        for key, label in names
        if isinstance(metrics.get(key), float | int)
    ]
    split = metrics.get("split")
    return ", ".join(parts) + (f" ({split})" if parts and split else "")


# -- stage 2: register -------------------------------------------------------------------------
def register_stage(
    factory: sessionmaker[Session], settings: Settings, checkpoint: Path, say: Say
) -> RegisterOutcome:
    """Register the checkpoint through the upload's service (reused when already there)."""
    from ..db.repositories import saes as sae_repo
    from . import tx
    from .sae_registry import UploadOptions, register_checkpoint, validate_checkpoint

    loaded = validate_checkpoint(checkpoint, settings)
    with factory() as s:
        existing = sae_repo.get_sae_by_hash(s, loaded.sha256)
        if existing is not None:
            say(f"reusing SAE {existing.slug!r} (the same weights are registered)")
            return RegisterOutcome(existing.id, existing.slug, reused=True)
        try:
            sae, warnings = register_checkpoint(
                s, settings, checkpoint, UploadOptions(uploader=AUTHOR)
            )
            sae_id, slug = sae.id, sae.slug
            tx.commit(s)
        except BaseException:
            tx.rollback(s)
            raise
    return RegisterOutcome(sae_id, slug, reused=False, warnings=warnings)


# -- stage 3: harvest --------------------------------------------------------------------------
def harvest_stage(
    factory: sessionmaker[Session],
    settings: Settings,
    cfg: DemoConfig,
    sae_id: int,
    say: Say,
    *,
    progress: bool = True,
) -> HarvestOutcome:
    """Harvest the registered SAE with the harvest engine (``harvest.runner``, the pass
    ``kronscope harvest`` and the harvest jobs run); reused when the SAE has an active
    harvest. An interrupted pass resumes from the state it saved."""
    import math

    from ..config import resolve_device
    from ..db.repositories import harvests as harvest_repo
    from ..db.repositories import saes as sae_repo
    from ..harvest import HarvestParams
    from ..harvest.runner import HarvestProgress, harvest
    from ..lm import load_corpus, load_model, make_contexts
    from ..sae import load as load_sae
    from .harvest_jobs import resolve_corpus
    from .sae_registry import sae_folder

    with factory() as s:
        row = sae_repo.get_sae(s, sae_id)
        if row is None:
            raise DemoError("the demo SAE disappeared from the database")
        active = harvest_repo.get_active_harvest(s, sae_id)
        if active is not None:
            say(
                f"reusing harvest {active.id} ({active.tokens_seen:,} tokens, {active.corpus_name})"
            )
            return HarvestOutcome(active.id, reused=True, tokens=int(active.tokens_seen or 0))
        folder, slug = sae_folder(settings, row), row.slug
        model_name, hook = row.model_name or cfg.model, row.hook_name or cfg.hook
        s.rollback()

    dev = resolve_device(cfg.device)
    sae = load_sae(folder, device=dev)
    model = load_model(model_name, device=dev, settings=settings)
    corpus = load_corpus(resolve_corpus(settings, cfg.corpus))
    n_contexts = math.ceil(cfg.harvest_tokens / cfg.harvest_ctx_len)
    contexts = make_contexts(
        corpus, model, cfg.harvest_ctx_len, seed=cfg.seed, max_contexts=n_contexts
    )
    if len(contexts) < n_contexts:
        say(
            f"the {cfg.corpus} corpus gives {len(contexts):,} contexts of {cfg.harvest_ctx_len} "
            f"tokens; harvesting all of them"
        )
    params = HarvestParams(
        examples=cfg.examples_per_latent,
        samples=cfg.samples_per_latent,
        seed=cfg.seed,
        checkpoint_every=max(16, len(contexts) // 8),  # so Ctrl-C loses little
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(contexts) * cfg.harvest_ctx_len,
            desc="harvest",
            unit="tok",
            unit_scale=True,
            dynamic_ncols=True,
        )
    writing = False

    def report(p: HarvestProgress) -> None:
        nonlocal writing
        if p.phase == "write" and not writing:
            writing = True
            if bar is not None:
                bar.n = bar.total or bar.n
                bar.refresh()
            say("writing the harvest to the database (one transaction)")
        elif bar is not None and p.phase != "write":
            bar.total = p.total
            bar.update(p.done - bar.n)

    say("Ctrl-C stops the pass; the next run resumes it from its last saved state")
    try:
        outcome = harvest(
            factory,
            slug,
            sae,
            model,
            contexts,
            params,
            corpus=corpus,
            hook_name=hook,
            progress=report,
            work_dir=settings.data_dir / "harvests",
        )
    except KeyboardInterrupt:
        raise DemoInterrupted(
            "the harvest stopped; its saved state is kept and the next run resumes it"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    if outcome.resumed_from:
        say(f"resumed after {outcome.resumed_from:,} contexts done before")
    with factory() as s:
        done = harvest_repo.get_harvest(s, outcome.harvest_id)
        tokens = int(done.tokens_seen or 0) if done is not None else 0
        s.rollback()
    return HarvestOutcome(outcome.harvest_id, reused=False, tokens=tokens)


# -- stage 4: explain --------------------------------------------------------------------------
def explain_stage(
    factory: sessionmaker[Session],
    settings: Settings,
    cfg: DemoConfig,
    sae_id: int,
    say: Say,
    *,
    progress: bool = True,
) -> ExplainOutcome:
    """Heuristic explanations of the SAE's units (reused when the SAE has some)."""
    from ..db.models import UnitKind
    from ..db.repositories import explanations as expl_repo
    from ..db.repositories import saes as sae_repo
    from . import explanations as svc
    from .explainers import ExplainerError

    with factory() as s:
        sae = sae_repo.get_sae(s, sae_id)
        if sae is None:
            raise DemoError("the demo SAE disappeared from the database")
        kinds = [(UnitKind.LATENT, sae.d_sae)]
        if sae.is_kronsae and cfg.explain_units != "latents":
            assert sae.h and sae.m and sae.n
            kinds = ([] if cfg.explain_units == "parents" else kinds) + [
                (UnitKind.BASE, sae.h * sae.m),
                (UnitKind.EXTENSION, sae.h * sae.n),
            ]
        have = 0
        for kind, count in kinds:
            found = expl_repo.explanations_for_units(s, sae_id, int(kind), range(count))
            have += sum(
                1 for items in found.values() if any(e.source == "heuristic" for e in items)
            )
        s.rollback()
    if have:
        say(f"reusing {have:,} heuristic explanations")
        return ExplainOutcome(reused=True, message=f"{have} heuristic explanations kept")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="explain", unit="unit", dynamic_ncols=True)

    def report(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)  # redraws at most every mininterval

    params = {
        "backend": "heuristic",
        "units": cfg.explain_units,
        "overwrite": False,
        "author": AUTHOR,
    }
    try:
        result = svc.generate(factory, settings, sae_id, params, report)
    except KeyboardInterrupt:
        raise DemoInterrupted("explanations stopped; nothing was written") from None
    except ExplainerError as exc:
        raise DemoError(f"explanations failed: {exc}; nothing was written") from exc
    finally:
        if bar is not None:
            bar.close()
    return ExplainOutcome(reused=False, message=result.message(), written=result.written)


# -- stage 5: key ------------------------------------------------------------------------------
def key_stage(factory: sessionmaker[Session]) -> KeyOutcome:
    """A new key with every scope; earlier demo keys stay valid (revoke them by id)."""
    from ..db.repositories import keys as key_repo
    from . import tx
    from .keys import SCOPES, create_key

    with factory() as s:
        try:
            earlier = [k.id for k in key_repo.list_keys(s) if k.name == KEY_NAME]
            key, plain = create_key(s, KEY_NAME, list(SCOPES))
            key_id = key.id
            tx.commit(s)
        except BaseException:
            tx.rollback(s)
            raise
    return KeyOutcome(plain, key_id, earlier)


# -- helpers for the command -------------------------------------------------------------------
class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds`` / ``t.shown``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start

    @property
    def shown(self) -> str:
        return format_seconds(self.seconds)


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m{sec:02d}s"
