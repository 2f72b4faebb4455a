"""KronSAE (arXiv 2505.22255): a Kronecker-factorised encoder composed by mAND.

The encoder has h heads; head g projects the input onto m base and n extension
directions. Latent ``(g, i, j)`` is ``mAND(p[g, i], q[g, j])``, so F = h*m*n latents
cost d*h*(m+n) multiply-adds instead of d*F. Flat index: ``g*(m*n) + i*n + j``.

mAND is computed exactly: ``sqrt(u*v)`` where both are positive, else 0 with a zero
gradient. The paper's appendix code adds 1e-5 under the root (about 0.0032 for inactive
pairs); weights trained with it load and encode unchanged, since TopK keeps the largest
values.

``encode`` never forms all F values: every value of a head is at most the product of
its largest base and largest extension (attained by one pair), so the k largest latents
of a token lie in the k heads with the largest such bounds. Only those heads' k*m*n pairs
are formed; the result equals the dense TopK (``encode_reference``) up to ties.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TopKStyleSAE
from .config import SAEConfig


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for x > 0 and 0 elsewhere, with a zero (not infinite) gradient at 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def mand(u: Tensor, v: Tensor) -> Tensor:
    """mAND(u, v) = sqrt(u*v) where u > 0 and v > 0, else 0 (broadcasting)."""
    return safe_sqrt(torch.relu(u) * torch.relu(v))


def compose(p: Tensor, q: Tensor, composition: str) -> Tensor:
    """All pairs of one head: p [..., m], q [..., n] -> [..., m, n].

    ``p`` and ``q`` are what ``KronSAE.parents`` returns (already ReLU'd except for
    ``product``)."""
    pp, qq = p.unsqueeze(-1), q.unsqueeze(-2)
    if composition == "mand":
        return mand(pp, qq)
    if composition == "relu_product":
        return torch.relu(pp) * torch.relu(qq)
    if composition == "product":
        return pp * qq
    raise ValueError(f"unknown composition {composition!r}")


class KronSAE(TopKStyleSAE):
    architecture = "kronsae"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        assert cfg.h and cfg.m and cfg.n
        self.h, self.m, self.n = cfg.h, cfg.m, cfg.n
        self.composition = cfg.composition

    # -- coordinates --------------------------------------------------------------------
    def coordinates(self, index: int) -> tuple[int, int, int]:
        """Flat latent index -> ``(head, base, extension)``."""
        index = int(index)
        if not 0 <= index < self.d_sae:
            raise IndexError(f"latent {index} is out of range 0..{self.d_sae - 1}")
        g, rest = divmod(index, self.m * self.n)
        i, j = divmod(rest, self.n)
        return g, i, j

    def index_of(self, head: int, base: int, extension: int) -> int:
        """``(head, base, extension)`` -> flat latent index."""
        if not (0 <= head < self.h and 0 <= base < self.m and 0 <= extension < self.n):
            raise IndexError(
                f"coordinates ({head}, {base}, {extension}) are out of range "
                f"(h={self.h}, m={self.m}, n={self.n})"
            )
        return head * self.m * self.n + base * self.n + extension

    def row_siblings(self, index: int) -> list[int]:
        """Latents sharing this latent's base parent ``(g, i)``, itself excluded."""
        g, i, j = self.coordinates(index)
        return [self.index_of(g, i, jj) for jj in range(self.n) if jj != j]

    def column_siblings(self, index: int) -> list[int]:
        """Latents sharing this latent's extension parent ``(g, j)``, itself excluded."""
        g, i, j = self.coordinates(index)
        return [self.index_of(g, ii, j) for ii in range(self.m) if ii != i]

    def base_children(self, head: int, base: int) -> list[int]:
        return [self.index_of(head, base, j) for j in range(self.n)]

    def extension_children(self, head: int, extension: int) -> list[int]:
        return [self.index_of(head, i, extension) for i in range(self.m)]

    # -- parents ------------------------------------------------------------------------
    def _parents(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.pre_acts(x).reshape(*x.shape[:-1], self.h, self.m + self.n)
        p, q = a[..., : self.m], a[..., self.m :]
        if self.composition != "product":  # the u*v ablation has no ReLU on its parents
            p, q = torch.relu(p), torch.relu(q)
        return p, q

    def parents(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[..., d_in] -> base [..., h, m] and extension [..., h, n] pre-latents."""
        p, q = self._chunked(lambda c: self._parents(c), x)
        return p, q

    # -- encoding -----------------------------------------------------------------------
    def _all_latents(self, x: Tensor) -> Tensor:
        """[rows, d_in] -> [rows, F]: every latent before TopK (the dense reference)."""
        p, q = self._parents(x)
        return compose(p, q, self.composition).reshape(x.shape[0], self.d_sae)

    def encode_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Dense TopK over all F latents: the tested reference for ``encode``."""

        def one(c: Tensor) -> tuple[Tensor, Tensor]:
            top = self._all_latents(c).topk(self.k, dim=-1)
            return top.values, top.indices

        values, indices = self._chunked(one, x)
        return values, indices

    def _encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p, q = self._parents(x)  # [B, h, m], [B, h, n]
        return self._topk_from_parents(p, q)

    def _topk_from_parents(self, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        rows, h, m, n, k = p.shape[0], self.h, self.m, self.n, self.k
        mn = m * n
        # Per-head upper bound on the pre-sqrt value; the bound is attained by one pair.
        if self.composition == "product":
            pmax, pmin = p.amax(-1), p.amin(-1)
            qmax, qmin = q.amax(-1), q.amin(-1)
            bound = torch.stack([pmax * qmax, pmin * qmin, pmax * qmin, pmin * qmax]).amax(0)
        else:
            bound = p.amax(-1) * q.amax(-1)  # p, q >= 0
        kh = min(k, h)
        heads = bound.topk(kh, dim=-1).indices  # [B, kh]
        ps = p.gather(1, heads.unsqueeze(-1).expand(rows, kh, m))
        qs = q.gather(1, heads.unsqueeze(-1).expand(rows, kh, n))
        pairs = (ps.unsqueeze(-1) * qs.unsqueeze(-2)).reshape(rows, kh * mn)
        top = pairs.topk(k, dim=-1)
        slot, within = top.indices // mn, top.indices % mn
        indices = heads.gather(1, slot) * mn + within
        values = safe_sqrt(top.values) if self.composition == "mand" else top.values
        return values, indices

    def _encode_dense(self, x: Tensor) -> Tensor:
        values, indices = self._encode_sparse(x)
        return torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=values.device).scatter(
            -1, indices, values
        )

    def all_latents(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., F]: every latent's composed value before TopK (large!)."""
        return self._chunked(lambda c: (self._all_latents(c),), x)[0]

    # -- initialisation (paper, appendix A) -----------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """W_enc ~ N(0,1)/sqrt(2F), biases 0; decoder row (g,i,j) = P[g,i] + Q[g,j], unit norm."""
        w = torch.randn(self.W_enc.shape, generator=generator, dtype=torch.float32) / (2 * self.d_sae) ** 0.5
        self.W_enc.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()
        cols = w.T.reshape(self.h, self.m + self.n, self.d_in)
        P, Q = cols[:, : self.m], cols[:, self.m :]  # [h, m, d], [h, n, d]
        dec = (P.unsqueeze(2) + Q.unsqueeze(1)).reshape(self.d_sae, self.d_in)
        self.W_dec.copy_(dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
