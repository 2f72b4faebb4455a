"""Per-unit streaming state, all in tensors (no Python loop over units).

:class:`KeyedTop` keeps, for each of U units, the K candidates with the largest int64
keys seen so far, with their context, position, value and the unit's values at every
token of that context (float16, [U, K, L]). Rows stay sorted by key, largest first. A
batch offers candidates as flat arrays; only units that receive a candidate beating their
current K-th key are touched, so after the first batches an update costs little more than
the candidate filter. Because the selection is "the K largest unique keys", the result is
the same however the candidates are split into batches or shards, and two states merge by
offering one's entries to the other.

:class:`Moments` holds the additive statistics: active counts, sums (float64), maxima and
fixed-bin histograms (exact integer counts).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .keys import EMPTY

F16_MAX = 65504.0
ROWS_AT_ONCE = 1 << 14
"""Per-token rows of new entries fetched and written at a time."""

RowsFn = Callable[[Tensor], Tensor]
"""Given indices into the offered candidates, their unit's values at every token of their
context: [E] -> [E, L] float32."""


def row_peak(rows: Tensor) -> tuple[Tensor, Tensor]:
    """[E, L] float32 per-token values -> each row's first maximum: (position int32, value)
    (a top context's entry)."""
    p = rows.argmax(1)
    return p.to(torch.int32), rows.gather(1, p.unsqueeze(1)).squeeze(1)


def row_f16(rows: Tensor) -> Tensor:
    """[E, L] float32 -> float16 (2 bytes a token), clipped as ``codec.pack_f16`` does:
    never inf. Clips ``rows`` in place."""
    return rows.clamp_(-F16_MAX, F16_MAX).to(torch.float16)


class KeyedTop:
    """The K largest keys per unit, with payload (see the module docstring).

    The small per-entry fields are kept sorted by key; the large per-token rows are not
    moved when the order changes: ``slot`` says where each entry's row lives in
    ``tokens``, and a new entry takes the slot of the one it pushed out, so an update
    writes only the rows of the entries that are new."""

    FIELDS = ("keys", "ctx", "pos", "value", "slot", "tokens")

    def __init__(self, units: int, k: int, length: int, device: torch.device | str = "cpu"):
        self.units, self.k, self.length = units, k, length
        self.keys = torch.full((units, k), EMPTY, dtype=torch.int64, device=device)
        """[U, K] int64, sorted descending per row; ``EMPTY`` marks a free entry."""
        self.ctx = torch.full((units, k), -1, dtype=torch.int64, device=device)
        """[U, K] global context index (-1 when empty)."""
        self.pos = torch.zeros((units, k), dtype=torch.int32, device=device)
        """[U, K] token position (the sampled token, or the first position of the maximum)."""
        self.value = torch.zeros((units, k), dtype=torch.float32, device=device)
        """[U, K] the unit's value at ``pos``."""
        self.slot = torch.arange(k, device=device).repeat(units, 1)
        """[U, K] where entry (u, r)'s row is in ``tokens`` (a permutation per unit)."""
        self.tokens = torch.zeros((units, k, length), dtype=torch.float16, device=device)
        """[U, K, L] per-token values of the unit in each entry's context, by slot."""

    # -- queries --------------------------------------------------------------------------
    @property
    def floor(self) -> Tensor:
        """[U] the smallest kept key (``EMPTY`` while a row is not full)."""
        return self.keys[:, -1]

    def count(self) -> Tensor:
        """[U] filled entries."""
        return (self.ctx >= 0).sum(1)

    def rows(self, unit: Tensor, rank: Tensor) -> Tensor:
        """Per-token values of entries ``(unit, rank)`` -> [E, L] float16."""
        return self.tokens[unit, self.slot[unit, rank]]

    def sorted_tokens(self) -> Tensor:
        """[U, K, L] per-token values in rank order."""
        return self.tokens.gather(1, self.slot.unsqueeze(-1).expand(-1, -1, self.length))

    # -- updates --------------------------------------------------------------------------
    def offer(
        self,
        unit: Tensor,
        key: Tensor,
        ctx: Tensor,
        value: Tensor | None,
        rows: RowsFn,
        pos: Tensor | None = None,
        *,
        grouped: bool = False,
    ) -> None:
        """Offer candidates (all [C]); keeps the K largest keys per unit.

        ``pos``/``value`` None: taken from the row (first position of its maximum), as for
        top-activating contexts. ``rows`` is called once, only for the winners.
        ``grouped``: the candidates come sorted by unit (as ``nonzero`` of a [U, X] mask
        gives them), which saves a sort."""
        if unit.numel() == 0:
            return
        sel = (key > self.floor[unit]).nonzero().squeeze(1)
        if sel.numel() == 0:
            return
        unit_s, key_s = unit[sel], key[sel]
        dev = self.keys.device
        # Group by unit (free when the caller says candidates come grouped already).
        order = None if grouped else torch.argsort(unit_s, stable=True)
        touched, counts = torch.unique_consecutive(
            unit_s if order is None else unit_s[order], return_counts=True
        )
        width = int(counts.max())
        truncate = width > 4 * self.k
        if truncate:
            # Many candidates for some unit: keep each unit's best K (keys are unique).
            order = torch.argsort(key_s, descending=True, stable=True)
            order = order[torch.argsort(unit_s[order], stable=True)]
            width = self.k
        starts = torch.cumsum(counts, 0) - counts
        row = torch.repeat_interleave(torch.arange(len(touched), device=dev), counts)
        rank = torch.arange(len(row), device=dev) - starts[row]
        cand = sel if order is None else sel[order]  # indices into the offered arrays
        if truncate:
            first = rank < self.k
            row, rank, cand = row[first], rank[first], cand[first]

        # Candidates as a [touched, width] matrix; the merge keeps the K largest keys.
        nt, k = len(touched), self.k
        cand_key = torch.full((nt, width), EMPTY, dtype=torch.int64, device=dev)
        cand_key[row, rank] = key[cand]
        cand_id = torch.full((nt, width), -1, dtype=torch.int64, device=dev)
        cand_id[row, rank] = cand

        # A stable sort, not topk: of equal keys (only ``EMPTY`` ones: real keys are unique
        # per unit) the old entry ranks first, so the result, slots included, is defined
        # (the fused path's merge, ``fused.keyed_merge``, follows the same rule).
        top_values, src = torch.sort(
            torch.cat([self.keys[touched], cand_key], 1), dim=1, descending=True, stable=True
        )
        top_values, src = top_values[:, :k], src[:, :k]
        from_old = src < k
        old_at = src.clamp(max=k - 1)
        new_id = torch.where(from_old, -1, cand_id.gather(1, (src - k).clamp(min=0)))

        old_slot = self.slot[touched]
        slot = old_slot.gather(1, old_at)
        ctx_new = self.ctx[touched].gather(1, old_at)
        pos_new = self.pos[touched].gather(1, old_at)
        val_new = self.value[touched].gather(1, old_at)
        # Entries not taken from the old row get the slots of the old entries dropped.
        kept = torch.zeros((nt, k), dtype=torch.int8, device=dev)
        kept.scatter_add_(1, old_at, from_old.to(torch.int8))  # 1 at surviving old entries
        free = old_slot.gather(1, torch.argsort(kept, dim=1, stable=True))  # dropped first
        fresh_rank = torch.cumsum((~from_old).to(torch.int64), 1) - 1
        slot = torch.where(from_old, slot, free.gather(1, fresh_rank.clamp(min=0)))

        fresh = new_id >= 0
        if bool(fresh.any()):
            r, c = fresh.nonzero(as_tuple=True)
            ids = new_id[r, c]
            ctx_new[r, c] = ctx[ids]
            if pos is not None:
                assert value is not None
                pos_new[r, c] = pos[ids].to(torch.int32)
                val_new[r, c] = value[ids].to(torch.float32)
            for lo in range(0, len(ids), ROWS_AT_ONCE):  # bounded memory in the first batches
                part = slice(lo, lo + ROWS_AT_ONCE)
                rp, cp = r[part], c[part]
                values_rows = rows(ids[part]).to(torch.float32)
                if pos is None:
                    pos_new[rp, cp], val_new[rp, cp] = row_peak(values_rows)
                self.tokens[touched[rp], slot[rp, cp]] = row_f16(values_rows)
        # Empty candidate entries that won (only while a row is not full) stay empty.
        empty = top_values == EMPTY
        ctx_new[empty] = -1
        pos_new[empty] = 0
        val_new[empty] = 0.0
        self.keys[touched] = top_values
        self.ctx[touched] = ctx_new
        self.pos[touched] = pos_new
        self.value[touched] = val_new
        self.slot[touched] = slot

    def merge(self, other: KeyedTop) -> None:
        """Add another state's entries (an exact merge: same as one pass over both)."""
        u, r = (other.ctx >= 0).nonzero(as_tuple=True)

        def rows(ids: Tensor) -> Tensor:
            return other.rows(u[ids], r[ids]).to(torch.float32)

        self.offer(
            u,
            other.keys[u, r],
            other.ctx[u, r],
            other.value[u, r],
            rows,
            other.pos[u, r],
            grouped=True,
        )

    # -- (de)serialisation ----------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{f}": getattr(self, f) for f in self.FIELDS}

    def load(self, tensors: dict[str, Tensor], prefix: str) -> None:
        _load_fields(self, self.FIELDS, tensors, prefix)


def _load_fields(
    obj: object, names: tuple[str, ...], tensors: dict[str, Tensor], prefix: str
) -> None:
    for f in names:
        t = tensors[f"{prefix}.{f}"]
        mine = getattr(obj, f)
        if t.shape != mine.shape or t.dtype != mine.dtype:
            raise ValueError(
                f"{prefix}.{f}: saved {list(t.shape)} {t.dtype}, expected {list(mine.shape)} {mine.dtype}"
            )
        mine.copy_(t)


class Moments:
    """Additive per-unit statistics over active (value > 0) valid tokens."""

    FIELDS = ("n_active", "total", "max", "hist")

    def __init__(self, units: int, bins: int, device: torch.device | str = "cpu"):
        self.n_active = torch.zeros(units, dtype=torch.int64, device=device)
        self.total = torch.zeros(units, dtype=torch.float64, device=device)
        """Sum of active values."""
        self.max = torch.zeros(units, dtype=torch.float32, device=device)
        """Largest value (0 for a unit never active)."""
        self.hist = torch.zeros((units, bins), dtype=torch.int64, device=device)

    def merge(self, other: Moments) -> None:
        self.n_active += other.n_active
        self.total += other.total
        torch.maximum(self.max, other.max, out=self.max)
        self.hist += other.hist

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{f}": getattr(self, f) for f in self.FIELDS}

    def load(self, tensors: dict[str, Tensor], prefix: str) -> None:
        _load_fields(self, self.FIELDS, tensors, prefix)
