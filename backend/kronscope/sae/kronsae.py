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
are formed; the result equals the dense TopK (``encode_reference``) up to ties. The
parents stay views of the encoder output (ReLU only on the kept ones) and heads are
bounded in row blocks, so memory is the [B, h*(m+n)] encoder output plus O(B*k*m*n).
For the ``product`` ablation a head's bound is the largest of its four corner products:
max*max and min*min alone are no bound when, e.g., p < 0 < q.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TopKStyleSAE
from .config import SAEConfig

# Head bounds are formed for at most this many (row, head) pairs at a time, so that the
# [block, h] temporaries stay small (2 MiB in fp32) beside the encoder output.
_BOUND_ELEMS = 1 << 19


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for x > 0 and 0 elsewhere, with a zero (not infinite) gradient at 0."""
    positive = x > 0
    return torch.where(
        positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x)
    )


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
    def _raw_parents(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[..., d_in] -> views of the affine encoder's output, before any ReLU:
        base [..., h, m] and extension [..., h, n] (no copy)."""
        a = self.pre_acts(x).reshape(*x.shape[:-1], self.h, self.m + self.n)
        return a[..., : self.m], a[..., self.m :]

    def _parents(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p, q = self._raw_parents(x)
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
        # The parents stay views of the encoder output: ReLU is applied only to what is kept.
        p, q = self._raw_parents(x)  # [B, h, m], [B, h, n]
        return self._topk_from_parents(p, q)

    def _top_heads(self, p: Tensor, q: Tensor, k: int) -> Tensor:
        """[B, k] (unordered): the k heads of each row with the largest bounds, where a
        head's bound is its largest pre-sqrt value, attained by one of its pairs.

        Rows go in blocks so that the [block, h] bounds stay small beside the parents."""
        rows = p.shape[0]
        block = max(1, _BOUND_ELEMS // self.h)
        heads = torch.empty(rows, k, dtype=torch.int64, device=p.device)
        for lo in range(0, rows, block):
            pb, qb = p[lo : lo + block], q[lo : lo + block]
            if self.composition == "product":
                # u*v is bilinear: its maximum over a head is one of the four corner products
                # (max*max and min*min alone miss e.g. p < 0 < q, where it is max(p)*min(q)).
                pmin, pmax = torch.aminmax(pb, dim=-1)
                qmin, qmax = torch.aminmax(qb, dim=-1)
                bound = torch.maximum(pmax * qmax, pmin * qmin)
                bound = torch.maximum(bound, torch.maximum(pmax * qmin, pmin * qmax))
            else:
                # relu(max) == max(relu): clamp the [block, h] maxima, never the parents.
                bound = pb.amax(-1).clamp_min_(0).mul_(qb.amax(-1).clamp_min_(0))
            heads[lo : lo + block] = bound.topk(k, dim=-1, sorted=False).indices
        return heads

    def _topk_from_parents(self, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """Exact TopK of all latents from their parents, forming only k*m*n pairs a row.

        ``p`` [B, h, m] and ``q`` [B, h, n] may be raw or already ReLU'd (ReLU is
        idempotent and applied here to the kept parents only); any strides."""
        rows, h, m, n, k = p.shape[0], self.h, self.m, self.n, self.k
        mn = m * n
        relu = self.composition != "product"
        if k >= h:  # every head is kept: no selection to make
            ps, qs = (torch.relu(p), torch.relu(q)) if relu else (p, q)
            top = (ps.unsqueeze(-1) * qs.unsqueeze(-2)).reshape(rows, h * mn).topk(k, dim=-1)
            indices = top.indices
        else:
            # The k largest latents lie in the k heads with the largest bounds (each of
            # those heads holds one latent at its bound, which no other head exceeds).
            # Selection needs no gradient; the kept pairs get theirs through the gathers.
            with torch.no_grad():
                heads = self._top_heads(p.detach(), q.detach(), k)  # [B, k]
            # Row-wise index_select of whole head blocks (far faster than gather).
            flat = (heads + torch.arange(rows, device=heads.device).unsqueeze(1) * h).reshape(-1)
            ps = p.reshape(rows * h, m).index_select(0, flat).view(rows, k, m)
            qs = q.reshape(rows * h, n).index_select(0, flat).view(rows, k, n)
            if relu:
                ps, qs = torch.relu(ps), torch.relu(qs)
            pairs = (ps.unsqueeze(-1) * qs.unsqueeze(-2)).reshape(rows, k * mn)
            top = pairs.topk(k, dim=-1)  # sorted: values largest first
            indices = heads.gather(1, top.indices // mn) * mn + top.indices % mn
        # sqrt is monotonic: apply it to the k kept values only (zero gradient at 0).
        values = safe_sqrt(top.values) if self.composition == "mand" else top.values
        return values, indices

    def all_latents(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., F]: every latent's composed value before TopK (large!)."""
        return self._chunked(lambda c: (self._all_latents(c),), x)[0]

    # -- initialisation (paper, appendix A) -----------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """W_enc ~ N(0,1)/sqrt(2F), biases 0; decoder row (g,i,j) = P[g,i] + Q[g,j], unit norm."""
        w = (
            torch.randn(self.W_enc.shape, generator=generator, dtype=torch.float32)
            / (2 * self.d_sae) ** 0.5
        )
        self.W_enc.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()
        cols = w.T.reshape(self.h, self.m + self.n, self.d_in)
        P, Q = cols[:, : self.m], cols[:, self.m :]  # [h, m, d], [h, n, d]
        dec = (P.unsqueeze(2) + Q.unsqueeze(1)).reshape(self.d_sae, self.d_in)
        self.W_dec.copy_(dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
