"""TopK SAE (Gao et al.; SAELens ``topk``): keep the k largest pre-activations, then ReLU.

Only the k kept values are ever decoded, through a sparse gather of ``W_dec`` rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TopKStyleSAE


class TopKSAE(TopKStyleSAE):
    architecture = "topk"

    def _encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        top = self.pre_acts(x).topk(self.k, dim=-1)
        return torch.relu(top.values), top.indices
