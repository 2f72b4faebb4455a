"""The parameters of a harvest, and the fixed histogram bins every harvest shares.

Histogram bins are defined on the bits of the float32 value, so a bin is found with one
shift instead of a logarithm or a binary search: with ``bins_per_octave = 2**b`` the bin
code of a positive value is ``bits >> (23 - b)``, i.e. each octave ``[2^e, 2^(e+1))`` is
cut at ``2^e * (1 + i / 2^b)``. Edges are exact floats and bins are left-closed
``[edge[i], edge[i+1])``; values below ``edge[1]`` count in the first bin and values at or
above ``edge[-2]`` in the last one. The edges are the same for every harvest with the same
parameters, so streaming, resumed and sharded counts are exact integers that simply add.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, fields
from typing import Any

HIST_VERSION = 1


@dataclass(frozen=True)
class HarvestParams:
    """What a harvest keeps. Two runs with equal params over the same contexts give equal
    results (and a restart with equal params resumes an unfinished run)."""

    examples: int = 20
    """Top-activating contexts kept per unit (ordered by max value, then context index)."""
    samples: int = 32
    """Uniform reservoir sample of active (context, position) pairs kept per unit."""
    batch_size: int = 16
    """Contexts per forward pass of the subject model."""
    seed: int = 0
    """Seeds the per-token sampling keys (and the corpus shuffle, by the caller)."""
    hist_min_exp: int = -16
    """The histogram starts at ``2**hist_min_exp`` (smaller positive values share bin 0)."""
    hist_bins_per_octave: int = 4
    """A power of two (1..1024): bins per doubling of the value."""
    hist_bins: int = 128
    """Number of bins (128 bins at 4 per octave cover 2^-16 .. 2^16)."""
    checkpoint_every: int = 2048
    """Save the resumable state after about this many contexts (0: never)."""
    logit_effects: int = 10
    """Top and bottom tokens kept per unit (causal LMs)."""
    neighbours: int = 10
    """Nearest latents by decoder cosine kept per latent."""

    def __post_init__(self) -> None:
        for f in ("examples", "samples", "batch_size", "hist_bins", "hist_bins_per_octave"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f} must be a positive whole number, got {value!r}")
        for f in ("checkpoint_every", "logit_effects", "neighbours", "seed"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{f} must be a whole number >= 0, got {value!r}")
        b = self.hist_bins_per_octave
        if b & (b - 1) or b > 1024:
            raise ValueError(f"hist_bins_per_octave must be a power of two <= 1024, got {b}")
        if not -120 <= self.hist_min_exp <= 100:
            raise ValueError(f"hist_min_exp must be in -120..100, got {self.hist_min_exp}")
        top = self.hist_min_exp + self.hist_bins / b
        if top > 127:
            raise ValueError("histogram bins reach past the float32 range")

    # -- histogram ----------------------------------------------------------------------
    @property
    def hist_shift(self) -> int:
        """Right shift of the float32 bits that gives the bin code."""
        return 23 - (self.hist_bins_per_octave.bit_length() - 1)

    @property
    def hist_code_lo(self) -> int:
        """Code of the first bin: ``bits(2**hist_min_exp) >> hist_shift``."""
        return ((127 + self.hist_min_exp) << 23) >> self.hist_shift

    def hist_edges(self) -> list[float]:
        """The ``hist_bins + 1`` bin edges (exact float32 values)."""
        return [
            struct.unpack("<f", struct.pack("<i", (self.hist_code_lo + i) << self.hist_shift))[0]
            for i in range(self.hist_bins + 1)
        ]

    # -- identity -----------------------------------------------------------------------
    def result_dict(self) -> dict[str, Any]:
        """The fields that decide the result, to find an unfinished run to resume. The batch
        size is one of them: batching can change activations in the last bits, and a resumed
        run must see exactly the batches of an uninterrupted one. The checkpoint cadence is
        not."""
        d = asdict(self)
        d.pop("checkpoint_every")
        return d

    def to_dict(self) -> dict[str, Any]:
        """Everything, plus the histogram edges, for ``harvest.params``."""
        return {
            **asdict(self),
            "hist_version": HIST_VERSION,
            "histogram_edges": self.hist_edges(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HarvestParams:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
