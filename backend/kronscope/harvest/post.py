"""After the pass: logit effects and decoder neighbours, chunked so F = 65k fits.

- Logit effects (causal LMs): a unit's decoder direction through the unembedding,
  ``W_dec[f] @ W_U^T``, top and bottom tokens with their values. The final norm is left out
  (as SAEDashboard / Neuronpedia do): the values rank tokens, their scale is indicative.
  KronSAE parents get the same for the *sum of their children's decoder rows* (a base
  ``(g, i)``: sum over j of ``W_dec[g,i,j]``; an extension ``(g, j)``: sum over i), the
  direction the parent contributes through its latents.
- Neighbours: the latents with the largest decoder cosine to each latent (itself
  excluded), from ``[chunk, d] @ [d, F]`` blocks with a top-k per block: memory is
  ``chunk * F`` however large F is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sae import SAE, KronSAE

DEFAULT_CHUNK = 512


def parent_directions(sae: KronSAE) -> tuple[Tensor, Tensor]:
    """Decoder directions of the parents: base [h*m, d] and extension [h*n, d] (sums of
    their children's rows)."""
    w = sae.W_dec.detach().to(torch.float32).view(sae.h, sae.m, sae.n, sae.d_in)
    return w.sum(2).reshape(sae.h * sae.m, -1), w.sum(1).reshape(sae.h * sae.n, -1)


@torch.no_grad()
def logit_effects(
    directions: Tensor, unembed: Tensor, k: int, chunk: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[U, d] directions, [V, d] unembedding -> top values/ids [U, k], bottom values/ids
    [U, k] (bottom sorted most negative first)."""
    w_u = unembed.to(directions.device, torch.float32)
    k = min(k, w_u.shape[0])
    outs: list[list[Tensor]] = [[], [], [], []]
    for start in range(0, directions.shape[0], chunk):
        logits = directions[start : start + chunk].to(torch.float32) @ w_u.T  # [c, V]
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        for out, t in zip(
            outs, (top.values, top.indices, bottom.values, bottom.indices), strict=True
        ):
            out.append(t.cpu())
    if not outs[0]:
        empty_v = torch.zeros(0, k)
        empty_i = torch.zeros(0, k, dtype=torch.int64)
        return empty_v, empty_i, empty_v, empty_i
    tv, ti, bv, bi = (torch.cat(o) for o in outs)
    return tv, ti, bv, bi


@torch.no_grad()
def decoder_neighbours(sae: SAE, k: int, chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """Nearest latents by decoder cosine, itself excluded: indices [F, k], cosines [F, k]."""
    w = sae.W_dec.detach().to(torch.float32)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    F = w.shape[0]
    k = min(k, F - 1)
    idx_out, cos_out = [], []
    for start in range(0, F, chunk):
        block = w[start : start + chunk] @ w.T  # [c, F]
        rows = torch.arange(block.shape[0], device=w.device)
        block[rows, rows + start] = -float("inf")  # never its own neighbour
        top = block.topk(k, dim=1)
        idx_out.append(top.indices.cpu())
        cos_out.append(top.values.cpu())
    return torch.cat(idx_out), torch.cat(cos_out)
