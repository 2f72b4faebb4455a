"""The torch core: SAE architectures, checkpoints and their importers.

Imports nothing from the web side. Fixed names other code relies on:
``load(path)``, ``sae.encode_dense``, ``sae.encode`` / ``sae.decode`` (TopK-style),
``sae.parents`` and ``sae.coordinates`` (KronSAE).
"""

from __future__ import annotations

import torch

from .base import SAE, EncodeOutput, ForwardOutput, TopKStyleSAE
from .config import ARCHITECTURES, COMPOSITIONS, SAEConfig
from .errors import CheckpointError, ConfigError, SAEError
from .jumprelu import JumpReLUSAE
from .kronsae import KronSAE, compose, mand
from .standard import StandardSAE
from .topk import TopKSAE

REGISTRY: dict[str, type[SAE]] = {
    cls.architecture: cls for cls in (KronSAE, TopKSAE, JumpReLUSAE, StandardSAE)
}


def build(cfg: SAEConfig, device: torch.device | str | None = None) -> SAE:
    """An SAE of ``cfg``'s architecture with zero weights (call ``init_weights`` or load)."""
    return REGISTRY[cfg.architecture](cfg, device=device)


def __getattr__(name: str):  # checkpoint functions, imported lazily to keep imports light
    if name in (
        "load",
        "save",
        "load_checkpoint",
        "save_checkpoint",
        "checkpoint_hash",
        "LoadedCheckpoint",
    ):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)


__all__ = [
    "ARCHITECTURES",
    "COMPOSITIONS",
    "REGISTRY",
    "SAE",
    "CheckpointError",
    "ConfigError",
    "EncodeOutput",
    "ForwardOutput",
    "JumpReLUSAE",
    "KronSAE",
    "SAEConfig",
    "SAEError",
    "StandardSAE",
    "TopKSAE",
    "TopKStyleSAE",
    "build",
    "compose",
    "mand",
]
