"""Everything a harvest accumulates, saved and loaded without pickle, merged exactly.

Units come in blocks: ``latent`` (F units) and, for KronSAE, ``parent`` (h*(m+n) units in
the encoder's column order ``g*(m+n) + c``: ``c < m`` is base ``g*m + c``, else extension
``g*n + c - m``; :func:`parent_units` maps them to ``(unit_kind, unit_index)``). Each block
has top-activating contexts, a reservoir sample and moments. KronSAE adds
``both_parents_active`` per latent (tokens where both parents are > 0).

On disk: ``<name>.safetensors`` (tensors) and ``<name>.json`` (counters, shapes, params),
each written to a temporary file and renamed, the JSON last: a state is complete when its
JSON exists and names the tensor file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import HarvestError
from .streaming import KeyedTop, Moments

STATE_VERSION = 1


@dataclass
class UnitBlock:
    """Top contexts, reservoir sample and moments of one group of units."""

    name: str
    units: int
    top: KeyedTop
    sample: KeyedTop
    moments: Moments

    @classmethod
    def empty(
        cls, name: str, units: int, examples: int, samples: int, length: int, bins: int, device: Any
    ) -> UnitBlock:
        return cls(
            name,
            units,
            KeyedTop(units, examples, length, device),
            KeyedTop(units, samples, length, device),
            Moments(units, bins, device),
        )

    def tensors(self) -> dict[str, Tensor]:
        out = self.top.tensors(f"{self.name}.top")
        out.update(self.sample.tensors(f"{self.name}.sample"))
        out.update(self.moments.tensors(f"{self.name}.moments"))
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.top.load(tensors, f"{self.name}.top")
        self.sample.load(tensors, f"{self.name}.sample")
        self.moments.load(tensors, f"{self.name}.moments")

    def merge(self, other: UnitBlock) -> None:
        self.top.merge(other.top)
        self.sample.merge(other.sample)
        self.moments.merge(other.moments)


@dataclass
class HarvestState:
    """The whole accumulated state of one harvest (or of one shard of it)."""

    latent: UnitBlock
    parent: UnitBlock | None = None
    both_parents_active: Tensor | None = None
    """[F] int64, KronSAE only."""
    contexts_done: int = 0
    """Contexts of this shard's schedule processed (``distributed.Shard.indices``)."""
    tokens_seen: int = 0
    """Tokens of the processed contexts, special tokens included."""
    tokens_valid: int = 0
    """Tokens that count (not special, not padding): the denominator of frequencies."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Identity of the run (params, shapes, shard); checked on load."""

    def blocks(self) -> list[UnitBlock]:
        return [self.latent] + ([self.parent] if self.parent is not None else [])

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for block in self.blocks():
            out.update(block.tensors())
        if self.both_parents_active is not None:
            out["both_parents_active"] = self.both_parents_active
        return out

    def counters(self) -> dict[str, int]:
        return {
            "contexts_done": self.contexts_done,
            "tokens_seen": self.tokens_seen,
            "tokens_valid": self.tokens_valid,
        }

    def merge(self, other: HarvestState) -> None:
        """Add another shard's state: the result equals one pass over both shards."""
        for mine, theirs in zip(self.blocks(), other.blocks(), strict=True):
            mine.merge(theirs)
        if self.both_parents_active is not None:
            assert other.both_parents_active is not None
            self.both_parents_active += other.both_parents_active
        self.contexts_done += other.contexts_done
        self.tokens_seen += other.tokens_seen
        self.tokens_valid += other.tokens_valid

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: Path, name: str = "state") -> Path:
        """Write ``name.safetensors`` and ``name.json`` atomically; returns the JSON path."""
        directory.mkdir(parents=True, exist_ok=True)
        tensor_path = directory / f"{name}.safetensors"
        json_path = directory / f"{name}.json"
        tmp = directory / f".{name}.safetensors.tmp"
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()}
        save_file(cpu, str(tmp))
        digest = _sha256(tmp)
        os.replace(tmp, tensor_path)
        doc = {
            "version": STATE_VERSION,
            "tensors": tensor_path.name,
            "sha256": digest,
            "counters": self.counters(),
            "meta": self.meta,
        }
        tmp_json = directory / f".{name}.json.tmp"
        tmp_json.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp_json, json_path)
        return json_path

    def load(self, directory: Path, name: str = "state") -> bool:
        """Load a saved state into this (empty) one. False when there is none; raises
        ``HarvestError`` when it exists but belongs to another run or is damaged."""
        json_path = directory / f"{name}.json"
        if not json_path.is_file():
            return False
        try:
            doc = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise HarvestError(f"saved harvest state {json_path} is unreadable: {exc}") from exc
        if doc.get("version") != STATE_VERSION:
            raise HarvestError(f"saved harvest state {json_path} has an unknown version")
        if doc.get("meta") != self.meta:
            raise HarvestError(
                f"saved harvest state {json_path} belongs to another run (different SAE, "
                "corpus, parameters or shard)"
            )
        tensor_path = directory / str(doc["tensors"])
        if not tensor_path.is_file() or _sha256(tensor_path) != doc.get("sha256"):
            raise HarvestError(f"saved harvest state {tensor_path} is missing or damaged")
        tensors = load_file(str(tensor_path))
        try:
            for block in self.blocks():
                block.load(tensors)
            if self.both_parents_active is not None:
                self.both_parents_active.copy_(tensors["both_parents_active"])
        except (KeyError, ValueError) as exc:
            raise HarvestError(f"saved harvest state {tensor_path} does not fit: {exc}") from exc
        counters = doc["counters"]
        self.contexts_done = int(counters["contexts_done"])
        self.tokens_seen = int(counters["tokens_seen"])
        self.tokens_valid = int(counters["tokens_valid"])
        return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def parent_units(h: int, m: int, n: int) -> tuple[Tensor, Tensor]:
    """Parent block column ``g*(m+n) + c`` -> ``(unit_kind, unit_index)`` (1 base, 2 extension)."""
    col = torch.arange(h * (m + n))
    g, c = col // (m + n), col % (m + n)
    is_base = c < m
    kind = torch.where(is_base, 1, 2)
    index = torch.where(is_base, g * m + c, g * n + (c - m))
    return kind, index
