"""Evaluation of an SAE on held-out activations: reconstruction, sparsity and LM loss.

SAE metrics (``metrics.py``) are measured on the non-special tokens of the held-out
contexts only (BOS, separators and padding are skipped, as in training).

LM loss (causal LMs): mean next-token cross-entropy over every position whose *target*
is a real (non-special) token, for three runs of the full model:

- ``clean``: unmodified;
- ``spliced``: the activation at the hook replaced by the SAE's reconstruction on the
  non-special positions (special positions keep their activation: the SAE never saw them,
  and BOS activations are often huge outliers);
- ``zero``: the same positions zero-ablated.

``delta_loss = spliced - clean``; ``loss_recovered = (zero - spliced) / (zero - clean)``.

Held-out split: see ``activations.split_contexts`` (the last 5% of the contexts in
``make_contexts(seed=0)`` order; training never reads them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .activations import ActivationSource
from .base import SAE
from .metrics import DENSE_THRESHOLD, MetricAccumulator, ReconstructionMetrics, json_safe

Splice = Callable[[Tensor, Tensor], Tensor]
"""``(activations [B, T, d], keep [B, T] bool) -> replacement [B, T, d]``."""


@dataclass
class LMLoss:
    clean: float
    spliced: float
    zero: float
    tokens: int

    @property
    def delta(self) -> float:
        return self.spliced - self.clean

    @property
    def recovered(self) -> float:
        gap = self.zero - self.clean
        return (self.zero - self.spliced) / gap if gap != 0 else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {
            "lm_loss_clean": self.clean,
            "lm_loss_spliced": self.spliced,
            "lm_loss_zero": self.zero,
            "delta_lm_loss": self.delta,
            "loss_recovered": self.recovered,
            "lm_loss_tokens": self.tokens,
        }


@dataclass
class EvalResult:
    metrics: ReconstructionMetrics
    lm: LMLoss | None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.metrics.as_dict())
        if self.lm is not None:
            out.update(self.lm.as_dict())
        return json_safe(out)


# -- pieces --------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(sae: SAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``x`` [N, d] -> ``(x_hat, values, indices)`` on the SAE's device, float32."""
    out = sae(x.to(sae.device))
    return out.x_hat.float(), out.values, out.indices


@torch.no_grad()
def evaluate_activations(
    sae: SAE,
    source: ActivationSource,
    tokens: int | None = None,
    batch_size: int = 4096,
    dense_threshold: float = DENSE_THRESHOLD,
) -> ReconstructionMetrics:
    """SAE metrics over the first ``tokens`` rows of ``source`` (all when None)."""
    total = source.available_tokens if tokens is None else min(tokens, source.available_tokens)
    acc = MetricAccumulator(sae.d_in, sae.d_sae, dense_threshold)
    for start in range(0, total, batch_size):
        x = source.read(start, min(total, start + batch_size))
        x_hat, values, indices = reconstruct(sae, x)
        acc.update(x, x_hat, values, indices)
    return acc.result()


def sae_splice(sae: SAE) -> Splice:
    """The splice replacing non-special activations by ``sae``'s reconstruction."""

    def fn(acts: Tensor, keep: Tensor) -> Tensor:
        x_hat, _, _ = reconstruct(sae, acts[keep])
        out = acts.clone()
        out[keep] = x_hat.to(out)
        return out

    return fn


def zero_splice(acts: Tensor, keep: Tensor) -> Tensor:
    out = acts.clone()
    out[keep] = 0
    return out


def _next_token_loss(logits: Tensor, input_ids: Tensor, target_ok: Tensor) -> tuple[float, int]:
    """Summed cross-entropy of positions t predicting t+1 where ``target_ok[t+1]``."""
    pred = logits[:, :-1].float()
    tgt = input_ids[:, 1:].to(pred.device)
    ok = target_ok[:, 1:].to(pred.device)
    if not bool(ok.any()):
        return 0.0, 0
    ce = torch.nn.functional.cross_entropy(pred[ok], tgt[ok], reduction="sum")
    return float(ce), int(ok.sum())


@torch.no_grad()
def lm_losses(
    model: Any,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    hook: str,
    splices: dict[str, Splice | None],
) -> tuple[dict[str, float], int]:
    """Mean next-token loss of ``model`` with each splice (None = clean) over ``batches`` of
    ``(input_ids, attention_mask, special_mask)``; returns ``({name: loss}, tokens)``."""
    sums = dict.fromkeys(splices, 0.0)
    count = 0
    for ids, mask, special in batches:
        keep = ~special.bool()
        n = 0
        for name, fn in splices.items():
            if fn is None:
                logits = model.forward_with_splice(ids, mask, hook, lambda a: a)
            else:
                logits = model.forward_with_splice(
                    ids, mask, hook, lambda a, fn=fn, keep=keep: fn(a, keep.to(a.device))
                )
            s, n = _next_token_loss(logits, ids, keep)
            sums[name] += s
        count += n
    if count == 0:
        raise ValueError("the held-out contexts have no real (non-special) target tokens")
    return {k: v / count for k, v in sums.items()}, count


def context_batches(
    contexts: Any, indices: Sequence[int], batch_size: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(input_ids, attention_mask, special_mask)`` of the chosen contexts, in batches."""
    out = []
    for i in range(0, len(indices), batch_size):
        idx = torch.tensor(list(indices[i : i + batch_size]), dtype=torch.long)
        out.append(
            (contexts.input_ids[idx], contexts.attention_mask[idx], contexts.special_mask[idx])
        )
    return out


@torch.no_grad()
def evaluate_on_contexts(
    sae: SAE,
    model: Any,
    contexts: Any,
    hook: str,
    indices: Sequence[int],
    *,
    batch_size: int = 8,
    lm_loss: bool = True,
    dense_threshold: float = DENSE_THRESHOLD,
    progress: bool = False,
) -> EvalResult:
    """SAE metrics (and, for causal LMs, LM losses) over the contexts ``indices``."""
    batches = context_batches(contexts, indices, batch_size)
    acc = MetricAccumulator(sae.d_in, sae.d_sae, dense_threshold)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc="evaluating", unit="batch")
    for ids, mask, special in batches:
        acts = model.activations(ids, mask, hook)
        x = acts[~special.bool().to(acts.device)].float()
        if x.shape[0]:
            x_hat, values, indices_ = reconstruct(sae, x)
            acc.update(x, x_hat, values, indices_)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    metrics = acc.result()
    lm = None
    if lm_loss and getattr(model, "is_causal_lm", False):
        losses, count = lm_losses(
            model, batches, hook, {"clean": None, "spliced": sae_splice(sae), "zero": zero_splice}
        )
        lm = LMLoss(losses["clean"], losses["spliced"], losses["zero"], count)
    return EvalResult(metrics, lm)
