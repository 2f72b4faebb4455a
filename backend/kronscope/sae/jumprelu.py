"""JumpReLU SAE (SAELens ``jumprelu``; BatchTopK training saves arrive as this too):
``f = relu(pre) * (pre > threshold)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SAE
from .config import SAEConfig


class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype, device=device))

    def _encode_dense(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)
