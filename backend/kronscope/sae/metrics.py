"""Reconstruction and sparsity metrics of an SAE, streamed over batches of tokens.

Definitions (used by training, ``kronscope eval`` and the benchmark alike):

- ``ev``   explained variance, ``1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2``, where
           ``mean(x)`` is the mean activation vector over all tokens seen (kronsae.md);
- ``fvu``  fraction of variance unexplained, ``1 - ev``;
- ``mse``  mean squared error per element, ``sum||x - x_hat||^2 / (tokens * d_in)``;
- ``l0``   mean number of non-zero latents per token;
- ``dead_fraction``   latents that never fired (value > 0) on the tokens measured;
- ``dense_fraction``  latents that fired on more than ``dense_threshold`` (10%) of them.

Sums are kept in float64, so the streamed figures do not depend on the batch size beyond
float32 rounding of the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""


@dataclass
class ReconstructionMetrics:
    """Metrics over a set of tokens (see the module docstring for the definitions)."""

    tokens: int
    ev: float
    fvu: float
    mse: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float = DENSE_THRESHOLD

    def as_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "ev": self.ev,
                "fvu": self.fvu,
                "mse": self.mse,
                "l0": self.l0,
                "dead_fraction": self.dead_fraction,
                "dense_fraction": self.dense_fraction,
                "dense_threshold": self.dense_threshold,
                "tokens": self.tokens,
            }
        )


def json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities become None (``cfg.json`` is strict JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """EV of one batch: ``x``, ``x_hat`` [tokens, d_in]."""
    x64, err = x.double(), (x - x_hat).double()
    sst = (x64 - x64.mean(0)).pow(2).sum()
    return float(1 - err.pow(2).sum() / sst) if sst > 0 else float("nan")


class MetricAccumulator:
    """Streams ``update(x, x_hat, values, indices)`` over batches, then ``result()``.

    ``values``/``indices`` are the sparse latents ([tokens, k]) of TopK-style SAEs; for
    dense architectures pass the dense latents [tokens, d_sae] as ``values`` and
    ``indices=None``.
    """

    def __init__(self, d_in: int, d_sae: int, dense_threshold: float = DENSE_THRESHOLD):
        self.d_in, self.d_sae, self.dense_threshold = d_in, d_sae, dense_threshold
        self.tokens = 0
        self.sse = 0.0
        self.active = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, values: Tensor, indices: Tensor | None) -> None:
        x = x.reshape(-1, self.d_in).double().cpu()
        x_hat = x_hat.reshape(-1, self.d_in).double().cpu()
        self.tokens += x.shape[0]
        self.sse += float((x - x_hat).pow(2).sum())
        self.sum_x += x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        fired = values.reshape(x.shape[0], -1) > 0
        self.active += int(fired.sum())
        if indices is None:
            self.fire_counts += fired.sum(0).cpu()
        else:
            idx = indices.reshape(x.shape[0], -1)[fired]
            self.fire_counts += torch.bincount(idx.cpu(), minlength=self.d_sae)

    def result(self) -> ReconstructionMetrics:
        if self.tokens == 0:
            raise ValueError("no tokens were measured")
        mean = self.sum_x / self.tokens
        sst = self.sum_x2 - self.tokens * float(mean.pow(2).sum())
        fvu = self.sse / sst if sst > 0 else float("nan")
        frac = self.fire_counts.double() / self.tokens
        return ReconstructionMetrics(
            tokens=self.tokens,
            ev=1 - fvu,
            fvu=fvu,
            mse=self.sse / (self.tokens * self.d_in),
            l0=self.active / self.tokens,
            dead_fraction=float((self.fire_counts == 0).double().mean()),
            dense_fraction=float((frac > self.dense_threshold).double().mean()),
            dense_threshold=self.dense_threshold,
        )
