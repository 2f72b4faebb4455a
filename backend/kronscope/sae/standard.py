"""ReLU SAE (SAELens ``standard``): ``f = relu(pre)``."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SAE


class StandardSAE(SAE):
    architecture = "standard"

    def _encode_dense(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x))
