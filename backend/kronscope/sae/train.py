"""Training of TopK and KronSAE SAEs with the paper's recipe (kronsae.md, appendix A).

Recipe (defaults): AdamW (torch defaults besides the lr: the paper names no betas or
weight decay), lr 8e-4 with 10% linear warm-up then cosine decay to 1e-6, batches of
8,192 tokens, loss = normalised MSE + 1/32 * AuxK. Both terms are normalised as in Gao
et al.'s reference code: ``||x - x_hat||^2 / ||x - mean(x)||^2`` over the batch (the
batch FVU) and, for AuxK, ``||e - e_hat||^2 / ||e - mean(e)||^2`` with ``e = x - x_hat``
(detached) and ``e_hat`` decoded (without ``b_dec``) from the top-``k_aux`` *dead*
latents. A latent is dead when it has not fired for ``dead_window`` tokens; with none
dead the AuxK term is exactly 0. Decoder rows stay unit norm: the gradient component
parallel to each row is removed before the step and rows are renormalised after it.

Initialisation: KronSAE uses ``KronSAE.init_weights`` (appendix A.1); TopK the usual
unit-norm random decoder with ``W_enc = W_dec.T``. ``b_dec`` is 0 (the paper) unless
``b_dec_init`` asks for the mean or the geometric median of the first batch.

AuxK for KronSAE never forms the [B, F] composed values: the k_aux winners among the
dead latents are chosen without gradient in row chunks of at most ``AUX_CHUNK`` values,
then only those ``B * k_aux`` values are recomputed from their parents with gradient.
The result is exactly the top-k_aux of the dead latents' composed values.

Determinism and resume: every random draw comes from generators seeded by ``seed``;
the data is a stream addressed by position (``activations.py``), so a checkpoint stores
only the tokens consumed, the optimizer state (safetensors), the schedule position and
RNG states (JSON + safetensors; nothing is pickled). Resuming reproduces the
uninterrupted run bit for bit on CPU.

This module imports nothing from the web side.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import __version__
from .activations import ActivationSource, iter_batches
from .base import SAE
from .config import SAEConfig
from .errors import SAEError
from .kronsae import KronSAE, safe_sqrt
from .metrics import MetricAccumulator

TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = "kronscope-trainer/1"
AUX_CHUNK = 1 << 24
"""Most dead-latent values formed at once while choosing the AuxK latents."""
TRAINABLE = ("kronsae", "topk")
B_DEC_INITS = ("zero", "mean", "median")


class TrainingError(SAEError):
    """Training cannot start or cannot go on."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; nothing was written after the last good checkpoint."""


class ResumeMismatchError(TrainingError):
    """The checkpoint to resume was trained with a different configuration."""

    def __init__(self, message: str, field: str):
        self.field = field
        super().__init__(message)


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: the paper's recipe, appendix A)."""

    tokens: int
    """Training tokens; the run takes ``tokens // batch_size`` steps."""
    batch_size: int = 8192
    """Tokens per step."""
    lr: float = 8e-4
    """Peak learning rate (AdamW)."""
    lr_end: float = 1e-6
    """Learning rate at the last step (cosine decay)."""
    warmup_fraction: float = 0.1
    """Share of the steps with a linear warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default; the paper does not state one)."""
    aux_coef: float = 1 / 32
    """AuxK penalty."""
    k_aux: int | None = None
    """Dead latents used by AuxK; None means d_in // 2."""
    dead_window: int = 10_000_000
    """Tokens without firing after which a latent counts as dead."""
    b_dec_init: str = "zero"
    """``zero`` (paper), ``mean`` or ``median`` (geometric median) of the first batch."""
    seed: int = 0
    """Seeds the initialisation (and, through the caller, the data order)."""
    checkpoint_every: int | None = None
    """Write a checkpoint every this many tokens (None: only at the end)."""
    device: str = "cpu"
    """Torch device the SAE trains on."""

    def validate(self) -> None:
        def positive(name: str, value: float) -> None:
            if not value > 0:
                raise TrainingError(f"{name} must be positive, got {value}")

        positive("batch size", self.batch_size)
        positive("tokens", self.tokens)
        positive("learning rate", self.lr)
        positive("dead window", self.dead_window)
        if self.lr_end < 0 or self.lr_end > self.lr:
            raise TrainingError(
                f"the final learning rate {self.lr_end} must lie between 0 and the lr {self.lr}"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise TrainingError(f"warm-up fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.aux_coef < 0:
            raise TrainingError(f"AuxK coefficient must not be negative, got {self.aux_coef}")
        if self.k_aux is not None and self.k_aux < 0:
            raise TrainingError(f"k_aux must not be negative, got {self.k_aux}")
        if self.b_dec_init not in B_DEC_INITS:
            raise TrainingError(
                f"b_dec init must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}"
            )
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise TrainingError(
                f"checkpoint interval must be positive, got {self.checkpoint_every}"
            )
        if self.tokens < self.batch_size:
            raise TrainingError(
                f"{self.tokens:,} training tokens are fewer than one batch of {self.batch_size:,}"
            )

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_fraction * self.steps)

    def resolved_k_aux(self, d_in: int) -> int:
        return d_in // 2 if self.k_aux is None else self.k_aux

    def lr_at(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based): linear warm-up, then cosine."""
        warm, total = self.warmup_steps, self.steps
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm - 1)
        return self.lr_end + (self.lr - self.lr_end) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def fingerprint(self, d_in: int) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint."""
        return {
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "lr_end": self.lr_end,
            "warmup_fraction": self.warmup_fraction,
            "weight_decay": self.weight_decay,
            "aux_coef": self.aux_coef,
            "k_aux": self.resolved_k_aux(d_in),
            "dead_window": self.dead_window,
            "b_dec_init": self.b_dec_init,
            "seed": self.seed,
        }


@dataclass
class StepStats:
    """What one step measured (shown in the progress bar, passed to callbacks)."""

    step: int
    tokens_seen: int
    loss: float
    fvu: float
    aux_loss: float
    l0: float
    dead_fraction: float
    lr: float

    @property
    def ev(self) -> float:
        return 1 - self.fvu


@dataclass
class TrainResult:
    sae: SAE
    tokens_seen: int
    steps: int
    interrupted: bool
    checkpoint: Path | None
    metrics: dict[str, Any]
    seconds: float
    history: list[StepStats] = field(default_factory=list)


Callback = Callable[["Trainer", StepStats], None]


# -- construction --------------------------------------------------------------------------


def new_sae(cfg: SAEConfig, seed: int = 0, device: str | torch.device = "cpu") -> SAE:
    """A freshly initialised SAE of a trainable architecture (seeded, on CPU then moved)."""
    from . import build

    if cfg.architecture not in TRAINABLE:
        raise TrainingError(
            f"training supports {' and '.join(TRAINABLE)}, not {cfg.architecture!r}"
        )
    sae = build(cfg)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(sae, KronSAE):
        sae.init_weights(gen)  # appendix A.1
    else:
        with torch.no_grad():  # Gao et al.: unit-norm decoder rows, encoder = decoder^T
            dec = torch.randn(sae.W_dec.shape, generator=gen)
            dec = dec / dec.norm(dim=-1, keepdim=True)
            sae.W_dec.copy_(dec)
            sae.W_enc.copy_(dec.T)
            sae.b_enc.zero_()
            sae.b_dec.zero_()
    return sae.to(device)


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm over the rows of ``x`` [N, d] (float64 internally)."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=-1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= eps * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y.float()


# -- the forward pass used in training ------------------------------------------------------


@dataclass
class TrainForward:
    x_hat: Tensor  # [B, d]
    values: Tensor  # [B, k]
    indices: Tensor  # [B, k]
    pre: tuple[Tensor, ...]  # TopK: (pre-acts [B, F],); KronSAE: (p [B, h, m], q [B, h, n])


def train_forward(sae: SAE, x: Tensor) -> TrainForward:
    """The SAE's forward pass without chunking, keeping what AuxK needs."""
    if isinstance(sae, KronSAE):
        p, q = sae._parents(x)
        values, indices = sae._topk_from_parents(p, q)
        pre: tuple[Tensor, ...] = (p, q)
    else:
        a = sae.pre_acts(x)
        top = a.topk(sae.cfg.k or 1, dim=-1)
        values, indices = torch.relu(top.values), top.indices
        pre = (a,)
    return TrainForward(sae.decode(values, indices), values, indices, pre)


def _dead_values(sae: SAE, pre: tuple[Tensor, ...], latents: Tensor, rows: slice) -> Tensor:
    """Pre-activation scores of ``latents`` (a [n] list) for ``rows``: [rows, n], monotone
    in the latent value (for mAND the value before the square root)."""
    if isinstance(sae, KronSAE):
        p, q = pre
        pu, qv = _parent_columns(sae, p[rows], q[rows], latents)
        return pu * qv
    return pre[0][rows].index_select(1, latents)


def _parent_columns(sae: KronSAE, p: Tensor, q: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
    mn, n, m = sae.m * sae.n, sae.n, sae.m
    g, r = latents // mn, latents % mn
    i, j = r // n, r % n
    pf, qf = p.reshape(p.shape[0], -1), q.reshape(q.shape[0], -1)
    if latents.ndim == 1:
        return pf.index_select(1, g * m + i), qf.index_select(1, g * n + j)
    return pf.gather(1, g * m + i), qf.gather(1, g * n + j)


def _latent_values(sae: SAE, pre: tuple[Tensor, ...], latents: Tensor) -> Tensor:
    """Values (with gradient) of chosen latents [B, j] per row, after the activation."""
    if isinstance(sae, KronSAE):
        pu, qv = _parent_columns(sae, pre[0], pre[1], latents)
        prod = pu * qv
        return safe_sqrt(prod) if sae.composition == "mand" else torch.relu(prod)
    return torch.relu(pre[0].gather(1, latents))


def aux_loss(
    sae: SAE, residual: Tensor, pre: tuple[Tensor, ...], dead: Tensor, k_aux: int
) -> Tensor:
    """AuxK (Gao et al.): reconstruct the residual ``x - x_hat`` from the top-``k_aux`` dead
    latents; ``||e - e_hat||^2 / ||e - mean(e)||^2``, 0 when no latent is dead."""
    dead_idx = dead.nonzero().squeeze(-1)
    if dead_idx.numel() == 0 or k_aux <= 0:
        return residual.new_zeros(())
    rows_total, ka = residual.shape[0], min(k_aux, dead_idx.numel())
    chunk = max(1, AUX_CHUNK // dead_idx.numel())
    with torch.no_grad():
        picks = [
            _dead_values(sae, pre, dead_idx, slice(r, r + chunk)).topk(ka, dim=-1).indices
            for r in range(0, rows_total, chunk)
        ]
    latents = dead_idx[torch.cat(picks)]  # [B, ka]
    vals = _latent_values(sae, pre, latents)
    e_hat = nn.functional.embedding_bag(
        latents, sae.W_dec, per_sample_weights=vals.to(sae.W_dec.dtype), mode="sum"
    )
    e_hat = sae._scale_out(e_hat)
    e = residual.detach().float()
    denom = (e - e.mean(0)).pow(2).sum()
    return torch.nan_to_num((e_hat.float() - e).pow(2).sum() / denom, nan=0.0, posinf=0.0)


# -- the trainer -----------------------------------------------------------------------------


class Trainer:
    """Trains ``sae`` on ``source`` with ``cfg``; checkpoints to ``out`` (optional).

    ``callbacks`` run after every step with the step's ``StepStats`` (tests inject faults
    there). ``evaluator`` (optional) computes the final metrics, e.g. on held-out data;
    without it the final checkpoint carries the metrics of the last training batches.
    """

    def __init__(
        self,
        sae: SAE,
        source: ActivationSource,
        cfg: TrainConfig,
        *,
        out: str | Path | None = None,
        data_info: dict[str, Any] | None = None,
        callbacks: list[Callback] | None = None,
        evaluator: Callable[[SAE], dict[str, Any]] | None = None,
        progress: bool = False,
        history: bool = False,
    ):
        if sae.cfg.architecture not in TRAINABLE:
            raise TrainingError(
                f"training supports {' and '.join(TRAINABLE)}, not {sae.cfg.architecture!r}"
            )
        if source.d_in != sae.d_in:
            raise TrainingError(
                f"the activations have width {source.d_in} but the SAE reads d_in = {sae.d_in}"
            )
        cfg.validate()
        self.sae, self.source, self.cfg = sae, source, cfg
        self.device = torch.device(cfg.device)
        self.sae.to(self.device)
        self.out = Path(out) if out is not None else None
        self.data_info = dict(data_info or {})
        self.callbacks = list(callbacks or [])
        self.evaluator = evaluator
        self.progress = progress
        self.keep_history = history
        self.k_aux = cfg.resolved_k_aux(sae.d_in)
        self.autocast = self.device.type == "cuda"  # bf16 mixed precision on GPU only
        self.step = 0
        self.tokens_seen = 0
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=self.device)
        self.optimizer = torch.optim.AdamW(
            sae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.last_checkpoint_tokens: int | None = None
        self._window = MetricAccumulator(sae.d_in, sae.d_sae)
        self._stop = False
        self._in_update = False
        if cfg.tokens > source.available_tokens:
            raise TrainingError(
                f"{cfg.tokens:,} training tokens were asked for but the activation source has only "
                f"{source.available_tokens:,} (data is never repeated; lower the token count or use more data)"
            )

    # -- state -------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        c = self.sae.cfg
        sae_fields = {
            "architecture": c.architecture,
            "d_in": c.d_in,
            "d_sae": c.d_sae,
            "k": c.k,
            "h": c.h,
            "m": c.m,
            "n": c.n,
            "composition": c.composition if c.architecture == "kronsae" else None,
            "apply_b_dec_to_input": c.apply_b_dec_to_input,
            "normalize_activations": c.normalize_activations,
            "dtype": c.dtype,
        }
        data = {f"data.{k}": v for k, v in self.source.describe().items()}
        return {**sae_fields, **self.cfg.fingerprint(c.d_in), **data}

    def training_metadata(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "total_tokens": self.cfg.steps * self.cfg.batch_size,
            "steps": self.step,
            "total_steps": self.cfg.steps,
            "batch_size": self.cfg.batch_size,
            "lr": self.cfg.lr,
            "lr_end": self.cfg.lr_end,
            "warmup_fraction": self.cfg.warmup_fraction,
            "optimizer": "AdamW",
            "weight_decay": self.cfg.weight_decay,
            "schedule": "linear warm-up, cosine decay",
            "aux_coef": self.cfg.aux_coef,
            "k_aux": self.k_aux,
            "dead_window": self.cfg.dead_window,
            "b_dec_init": self.cfg.b_dec_init,
            "seed": self.cfg.seed,
            "code_version": __version__,
            "data": self.source.describe(),
            **self.data_info,
        }

    def _state_tensors(self) -> dict[str, Tensor]:
        names = [n for n, _ in self.sae.named_parameters()]
        out: dict[str, Tensor] = {"dead.since_fired": self.since_fired.cpu()}
        for idx, st in self.optimizer.state_dict()["state"].items():
            for key, value in st.items():
                if isinstance(value, Tensor):
                    out[f"optimizer.{names[idx]}.{key}"] = value.detach().cpu().contiguous()
        out["rng.torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                out[f"rng.cuda.{i}"] = s
        return out

    def _state_json(self) -> dict[str, Any]:
        groups = []
        for g in self.optimizer.state_dict()["param_groups"]:
            groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
        return {
            "format": STATE_FORMAT,
            "code_version": __version__,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "fingerprint": self.fingerprint(),
            "train_config": asdict(self.cfg),
            "optimizer": {
                "name": "AdamW",
                "param_names": [n for n, _ in self.sae.named_parameters()],
                "param_groups": groups,
            },
            "scheduler": {
                "name": "linear-warmup-cosine",
                "step": self.step,
                "total_steps": self.cfg.steps,
                "warmup_steps": self.cfg.warmup_steps,
                "lr": self.cfg.lr,
                "lr_end": self.cfg.lr_end,
            },
            "rng": {"torch_cpu": "rng.torch_cpu", "cuda_devices": torch.cuda.device_count()},
        }

    def save_checkpoint(
        self, metrics: dict[str, Any] | None = None, out: str | Path | None = None
    ) -> Path:
        """Write the SAE (native format) plus the trainer state; replaces ``out`` atomically."""
        from .checkpoint import save  # written beside this module

        target = Path(out) if out is not None else self.out
        if target is None:
            raise TrainingError("no output folder was given for checkpoints")
        meta = self.sae.cfg.metadata
        meta["training"] = self.training_metadata()
        if metrics is None:
            metrics = self._window_metrics()
        meta["metrics"] = metrics
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p)
        try:
            save(self.sae, tmp)
            save_file(self._state_tensors(), str(tmp / TRAINER_STATE_TENSORS))
            (tmp / TRAINER_STATE_JSON).write_text(json.dumps(self._state_json(), indent=2))
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        self.last_checkpoint_tokens = self.tokens_seen
        return target

    def _window_metrics(self) -> dict[str, Any]:
        if self._window.tokens == 0:
            return {}
        m = self._window.result().as_dict()
        m["split"] = "train (batches since the previous checkpoint)"
        return m

    def load_state(self, path: str | Path) -> None:
        """Restore optimizer, schedule, dead-latent counters and RNG from a checkpoint folder
        (the SAE weights are loaded by the caller through ``kronscope.sae.load``)."""
        path = Path(path)
        state = read_trainer_state(path)
        check_resume(state["fingerprint"], self.fingerprint(), path)
        tensors = load_file(str(path / TRAINER_STATE_TENSORS))
        names = state["optimizer"]["param_names"]
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                pname, _, skey = key[len("optimizer.") :].rpartition(".")
                opt_state.setdefault(names.index(pname), {})[skey] = value
        groups = []
        for g in state["optimizer"]["param_groups"]:
            g = dict(g)
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.since_fired = tensors["dead.since_fired"].to(self.device)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        torch.set_rng_state(tensors["rng.torch_cpu"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        self.last_checkpoint_tokens = self.tokens_seen

    # -- initialisation from data --------------------------------------------------------
    @torch.no_grad()
    def init_b_dec(self) -> None:
        if self.cfg.b_dec_init == "zero":
            return
        first = self.source.read(0, self.cfg.batch_size)
        value = first.mean(0) if self.cfg.b_dec_init == "mean" else geometric_median(first)
        if self.sae.cfg.normalize_activations == "expected_average_only_in":
            value = value * float(self.sae.cfg.norm_scaling_factor or 1.0)
        self.sae.b_dec.copy_(value.to(self.sae.b_dec))

    # -- one step -------------------------------------------------------------------------
    def _step(self, x: Tensor) -> StepStats:
        cfg, sae = self.cfg, self.sae
        lr = cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        dead = self.since_fired >= cfg.dead_window
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        with ctx:
            fw = train_forward(sae, x)
            err = x - fw.x_hat.float()
            fvu = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
            aux = (
                aux_loss(sae, err, fw.pre, dead, self.k_aux)
                if cfg.aux_coef > 0
                else x.new_zeros(())
            )
            loss = fvu + cfg.aux_coef * aux
        if not torch.isfinite(loss):
            start = self.tokens_seen
            bad_input = not bool(torch.isfinite(x).all())
            why = (
                f"the activations of tokens {start:,}..{start + x.shape[0]:,} contain NaN or infinite values"
                if bad_input
                else "try a lower learning rate"
            )
            kept = (
                f"the last good checkpoint ({self.last_checkpoint_tokens:,} tokens) is kept in {self.out}"
                if self.last_checkpoint_tokens is not None and self.out is not None
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLossError(
                f"loss became {float(loss.detach())} at step {self.step + 1} ({start:,} tokens seen; {why}); "
                f"training stopped and {kept}"
            )
        self._in_update = True
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, gw = sae.W_dec, sae.W_dec.grad
            if gw is not None:  # keep rows on the unit sphere: drop the radial gradient
                gw.sub_((gw * w).sum(-1, keepdim=True) * w)
        self.optimizer.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            fired = fw.values > 0
            counts = torch.bincount(fw.indices[fired], minlength=sae.d_sae)
            self.since_fired += x.shape[0]
            self.since_fired[counts > 0] = 0
            self.step += 1
            self.tokens_seen += x.shape[0]
        self._in_update = False
        self._window.update(x.detach(), fw.x_hat.detach().float(), fw.values.detach(), fw.indices)
        return StepStats(
            step=self.step,
            tokens_seen=self.tokens_seen,
            loss=float(loss.detach()),
            fvu=float(fvu.detach()),
            aux_loss=float(aux.detach()),
            l0=float(fired.sum()) / x.shape[0],
            dead_fraction=float(dead.float().mean()),
            lr=lr,
        )

    # -- the loop -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to checkpoint and stop after the current step (what Ctrl-C does)."""
        self._stop = True

    def _batches(self) -> Iterator[Tensor]:
        for x in iter_batches(self.source, self.cfg.batch_size, start=self.tokens_seen):
            yield x.to(self.device, non_blocking=True)

    def run(self) -> TrainResult:
        """Train to ``cfg.tokens``; on Ctrl-C checkpoint and return ``interrupted=True``."""
        cfg = self.cfg
        fresh = self.last_checkpoint_tokens is None
        if fresh and self.out is not None and self.out.exists() and any(self.out.iterdir()):
            raise TrainingError(
                f"output folder {self.out} exists and is not empty; choose another one or resume it"
            )
        if self.step == 0 and self.tokens_seen == 0:
            self.init_b_dec()
        history: list[StepStats] = []
        self._stop = False
        start_time = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.steps * cfg.batch_size,
                initial=self.tokens_seen,
                unit="tok",
                unit_scale=True,
                desc=f"training {self.sae.cfg.architecture}",
                dynamic_ncols=True,
            )
        interrupted = False
        try:
            with self._sigint_to_stop():
                batches = self._batches()
                while self.step < cfg.steps and not self._stop:
                    x = next(batches, None)
                    if x is None:
                        raise TrainingError(
                            f"the activation stream ended at {self.tokens_seen:,} tokens, before "
                            f"{cfg.steps * cfg.batch_size:,}"
                        )
                    stats = self._step(x)
                    if self.keep_history:
                        history.append(stats)
                    if bar is not None:
                        bar.update(x.shape[0])
                        bar.set_postfix(
                            ev=f"{stats.ev:.3f}",
                            l0=f"{stats.l0:.1f}",
                            dead=f"{stats.dead_fraction:.3f}",
                            aux=f"{stats.aux_loss:.3f}",
                            refresh=False,
                        )
                    for cb in self.callbacks:
                        cb(self, stats)
                    if (
                        cfg.checkpoint_every
                        and self.out is not None
                        and self.step < cfg.steps
                        and self.tokens_seen // cfg.checkpoint_every
                        > (self.tokens_seen - x.shape[0]) // cfg.checkpoint_every
                    ):
                        self.save_checkpoint()
                        self._window = MetricAccumulator(self.sae.d_in, self.sae.d_sae)
                interrupted = self._stop and self.step < cfg.steps
        except KeyboardInterrupt:
            if self._in_update:  # a forced interrupt inside an update: the state is torn
                raise
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        checkpoint = None
        if interrupted:
            metrics = self._window_metrics()
            if self.out is not None:
                checkpoint = self.save_checkpoint(metrics)
        else:
            metrics = (
                self.evaluator(self.sae) if self.evaluator is not None else self._window_metrics()
            )
            if self.out is not None:
                checkpoint = self.save_checkpoint(metrics)
        return TrainResult(
            sae=self.sae,
            tokens_seen=self.tokens_seen,
            steps=self.step,
            interrupted=interrupted,
            checkpoint=checkpoint,
            metrics=metrics,
            seconds=time.perf_counter() - start_time,
            history=history,
        )

    @contextmanager
    def _sigint_to_stop(self) -> Iterator[None]:
        """First Ctrl-C: finish the step, checkpoint, stop. A second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


# -- resume helpers ------------------------------------------------------------------------


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / TRAINER_STATE_JSON
    if not file.is_file() or not (path / TRAINER_STATE_TENSORS).is_file():
        raise TrainingError(
            f"{path} is not a resumable checkpoint ({TRAINER_STATE_JSON} and {TRAINER_STATE_TENSORS} are needed)"
        )
    try:
        state = json.loads(file.read_text())
    except ValueError as exc:
        raise TrainingError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(
            f"{file}: unknown trainer state format {state.get('format') if isinstance(state, dict) else None!r}"
        )
    return state


def check_resume(saved: dict[str, Any], wanted: dict[str, Any], path: str | Path) -> None:
    """Raise ``ResumeMismatchError`` naming the first field that differs."""
    for key in list(saved) + [k for k in wanted if k not in saved]:
        a, b = saved.get(key), wanted.get(key)
        if a != b:
            raise ResumeMismatchError(
                f"cannot resume from {path}: '{key}' differs (checkpoint: {a!r}, this run: {b!r})",
                key,
            )


def resume_trainer(
    path: str | Path, source: ActivationSource, cfg: TrainConfig, **kwargs: Any
) -> Trainer:
    """A trainer continuing the run checkpointed at ``path`` (weights, optimizer, RNG)."""
    from .checkpoint import load

    read_trainer_state(path)  # a clear error before loading weights
    sae = load(path)
    trainer = Trainer(sae, source, cfg, **kwargs)
    trainer.load_state(path)
    return trainer


# -- iso-FLOPs (kronsae.md, Eq. 7) -----------------------------------------------------------


def flops_topk(d: int, F: int, k: int) -> int:
    """Eq. 7: FLOPs per token of a TopK SAE: ``d*F + k*d``."""
    return d * F + k * d


def flops_kron(d: int, h: int, m: int, n: int, k: int) -> int:
    """Eq. 7: FLOPs per token of a KronSAE: ``d*h*(m+n) + m*n*h + k*d``."""
    return d * h * (m + n) + m * n * h + k * d


def sae_flops(cfg: SAEConfig) -> int:
    """Eq. 7 FLOPs per token of a TopK or KronSAE configuration."""
    if cfg.architecture == "kronsae":
        assert cfg.h and cfg.m and cfg.n and cfg.k
        return flops_kron(cfg.d_in, cfg.h, cfg.m, cfg.n, cfg.k)
    return flops_topk(cfg.d_in, cfg.d_sae, cfg.k or 0)


def iso_flops_tokens(topk_tokens: int, d: int, h: int, m: int, n: int, k: int) -> int:
    """Tokens a KronSAE may see for the FLOPs a TopK SAE of equal F = h*m*n spends on
    ``topk_tokens`` tokens: ``T * FLOPs_TopK / FLOPs_Kron`` (rounded down)."""
    return topk_tokens * flops_topk(d, h * m * n, k) // flops_kron(d, h, m, n, k)
