"""From a finished :class:`HarvestState` to plain per-unit results (still no database).

Everything is turned into the layout the tables use: unit kinds and flat indices
(latent 0, base 1, extension 2), examples in rank order, trimmed histograms, logit effects
and neighbours. Kept separate from the writer so that tests and benchmarks can inspect
exactly what would be stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..sae import SAE, KronSAE
from .params import HarvestParams
from .post import decoder_neighbours, logit_effects, parent_directions
from .state import HarvestState, UnitBlock, parent_units
from .streaming import KeyedTop


@dataclass
class ExampleSet:
    """All examples of one kind (top or sample) of a block, flattened to E rows."""

    unit_kind: np.ndarray
    unit_index: np.ndarray
    rank: np.ndarray
    ctx: np.ndarray
    """Global context index of each example."""
    values: np.ndarray
    """[E, L] float16: the unit's value at every token of the context."""
    max_value: np.ndarray
    max_pos: np.ndarray
    sample_pos: np.ndarray | None
    sample_value: np.ndarray | None

    def __len__(self) -> int:
        return len(self.rank)


@dataclass
class UnitResults:
    """Per-unit statistics of a block, in unit order (numpy arrays of length U)."""

    unit_kind: np.ndarray
    unit_index: np.ndarray
    n_active: np.ndarray
    frequency: np.ndarray
    mean_value: np.ndarray
    """NaN for units never active."""
    max_value: np.ndarray
    hist: np.ndarray
    """[U, bins] int64 counts."""
    both_parents_active: np.ndarray | None = None
    kept_count: np.ndarray | None = None
    logit_top: list[list[tuple[int, float]]] | None = None
    logit_bottom: list[list[tuple[int, float]]] | None = None
    neighbours: list[list[tuple[int, float]]] | None = None


@dataclass
class HarvestResult:
    """What a harvest stores: examples and unit results of every block."""

    params: HarvestParams
    tokens_seen: int
    tokens_valid: int
    examples: list[tuple[int, ExampleSet]] = field(default_factory=list)
    """``(example kind, set)``: 0 top, 1 sample."""
    units: list[UnitResults] = field(default_factory=list)

    def context_indices(self) -> np.ndarray:
        """Sorted global indices of every context an example refers to."""
        parts = [s.ctx for _, s in self.examples if len(s)]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _examples(top: KeyedTop, kinds: Tensor, indices: Tensor, sample: bool) -> ExampleSet:
    u, r = (top.ctx >= 0).nonzero(as_tuple=True)
    values = top.rows(u, r).to(torch.float32)
    if sample:
        max_pos = values.argmax(1)
        max_value = values.gather(1, max_pos.unsqueeze(1)).squeeze(1)
    else:
        max_pos, max_value = top.pos[u, r].to(torch.int64), top.value[u, r]
    return ExampleSet(
        unit_kind=kinds[u].numpy(),
        unit_index=indices[u].numpy(),
        rank=r.numpy(),
        ctx=top.ctx[u, r].cpu().numpy(),
        values=values.to(torch.float16).cpu().numpy(),
        max_value=max_value.cpu().numpy(),
        max_pos=max_pos.cpu().numpy(),
        sample_pos=top.pos[u, r].cpu().numpy() if sample else None,
        sample_value=top.value[u, r].cpu().numpy() if sample else None,
    )


def _units(block: UnitBlock, kinds: Tensor, indices: Tensor, tokens_valid: int) -> UnitResults:
    mo = block.moments
    n = mo.n_active.cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, mo.total.cpu().numpy() / np.maximum(n, 1), np.nan)
    return UnitResults(
        unit_kind=kinds.numpy(),
        unit_index=indices.numpy(),
        n_active=n,
        frequency=n / max(tokens_valid, 1),
        mean_value=mean,
        max_value=mo.max.cpu().numpy(),
        hist=mo.hist.cpu().numpy(),
    )


def _pairs(idx: Tensor, val: Tensor) -> list[list[tuple[int, float]]]:
    return [
        [(int(i), float(v)) for i, v in zip(ri, rv, strict=True)]
        for ri, rv in zip(idx.tolist(), val.tolist(), strict=True)
    ]


def build_result(
    state: HarvestState, sae: SAE, params: HarvestParams, unembed: Tensor | None = None
) -> HarvestResult:
    """Turn a finished (merged) state into per-unit results; computes logit effects (when
    ``unembed`` [V, d] is given) and decoder neighbours."""
    result = HarvestResult(params, state.tokens_seen, state.tokens_valid)
    F = sae.d_sae
    blocks: list[tuple[UnitBlock, Tensor, Tensor, Tensor | None]] = [
        (state.latent, torch.zeros(F, dtype=torch.int64), torch.arange(F), None)
    ]
    if state.parent is not None:
        assert isinstance(sae, KronSAE)
        kinds, indices = parent_units(sae.h, sae.m, sae.n)
        base, ext = parent_directions(sae)
        # Directions in the parent block's column order g*(m+n) + c.
        dirs = torch.cat([base.view(sae.h, sae.m, -1), ext.view(sae.h, sae.n, -1)], 1).reshape(
            -1, sae.d_in
        )
        blocks.append((state.parent, kinds, indices, dirs))
    for block, unit_kinds, unit_indices, directions in blocks:
        result.examples.append((0, _examples(block.top, unit_kinds, unit_indices, sample=False)))
        result.examples.append((1, _examples(block.sample, unit_kinds, unit_indices, sample=True)))
        units = _units(block, unit_kinds, unit_indices, state.tokens_valid)
        if unembed is not None and params.logit_effects > 0:
            d = sae.W_dec.detach().to(torch.float32) if directions is None else directions
            tv, ti, bv, bi = logit_effects(d, unembed, params.logit_effects)
            units.logit_top, units.logit_bottom = _pairs(ti, tv), _pairs(bi, bv)
        if block is state.latent:
            if params.neighbours > 0 and F > 1:
                ni, nc = decoder_neighbours(sae, params.neighbours)
                units.neighbours = _pairs(ni, nc)
            if state.both_parents_active is not None:
                units.both_parents_active = state.both_parents_active.cpu().numpy()
                units.kept_count = units.n_active.copy()
        result.units.append(units)
    return result
