"""The SAE's affine encoder for the harvest, transposed: ``[T, d_in] -> [width, T]``.

The harvest reads every unit's values along contiguous memory, so it wants the
pre-activations units-major; one GEMM ``W_enc^T @ x^T`` gives them so directly.

On CPU, for float32, that GEMM runs through oneDNN (the library behind torch's
``mkldnn`` ops) with the encoder bias folded in as one more input column, instead of
torch's default float32 GEMM (MKL). On the 2-core AMD EPYC (Zen 5) of our benchmark
machine the KronSAE benchmark's shape (12,288 x 576 x 2,048) took 150-165 ms with MKL and
85-90 ms with oneDNN, a fresh output included (``benchmarks/encoder_gemm.py``). Both are
float32 GEMMs: their results differ by float rounding only (a few units in the last
place of a 577-term sum). Everywhere else (GPU, other dtypes, a torch built without
oneDNN, or an op that fails its check at start) it is ``torch.addmm``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sae import SAE


def _mkldnn_ops_work() -> bool:
    """Whether torch's oneDNN linear ops exist here and compute a small product right."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(24, 9, generator=gen)
        b = torch.randn(16, 9, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(b, 24)
        got = torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return got.shape == (24, 16) and torch.allclose(got, a @ b.t(), rtol=1e-5, atol=1e-5)


class TransposedEncoder:
    """``sae``'s pre-activations computed transposed, ``[T, d_in] -> [width, T]`` float32,
    by one GEMM (see the module's docstring for which).

    Holds a copy of ``[W_enc^T | b_enc]`` on the oneDNN path (``width x (d_in + 1)``
    floats): build it after the SAE's weights are final."""

    def __init__(self, sae: SAE):
        self.sae = sae
        self.onednn = (
            sae.device.type == "cpu"
            and sae.W_enc.dtype == torch.float32
            and sae.b_enc.dtype == torch.float32
            and _mkldnn_ops_work()
        )
        self._w_aug: Tensor | None = None
        if self.onednn:
            with torch.no_grad():
                self._w_aug = torch.cat([sae.W_enc.t(), sae.b_enc.unsqueeze(1)], 1).contiguous()

    @torch.no_grad()
    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Pre-activations ``[width, T]`` of ``x`` [T, d_in]. ``out`` (float32 [width, T]),
        when given, is used by the addmm path (the oneDNN op makes its own output)."""
        s = _encoder_input(self.sae, x)
        if self._w_aug is None or s.dtype != torch.float32 or s.device.type != "cpu":
            return _addmm_t(self.sae, s, out)
        s1 = torch.cat([s, s.new_ones(s.shape[0], 1)], 1)  # the bias column's partner
        packed = torch.ops.mkldnn._reorder_linear_weight(s1, self._w_aug.shape[0])
        return torch.ops.mkldnn._linear_pointwise(self._w_aug, packed, None, "none", [], "")


def _encoder_input(sae: SAE, x: Tensor) -> Tensor:
    s = sae._scale_in(x)
    return s - sae.b_dec if sae.cfg.apply_b_dec_to_input else s


def _addmm_t(sae: SAE, s: Tensor, out: Tensor | None) -> Tensor:
    if out is not None and sae.W_enc.dtype == torch.float32 and s.dtype == torch.float32:
        return torch.addmm(sae.b_enc.unsqueeze(1), sae.W_enc.t(), s.t(), out=out)
    return torch.addmm(sae.b_enc.unsqueeze(1), sae.W_enc.t(), s.t()).to(torch.float32)


def pre_acts_t(sae: SAE, x: Tensor, out: Tensor | None = None) -> Tensor:
    """[T, d_in] -> [width, T]: the SAE's ``pre_acts`` computed transposed by torch's
    default GEMM, into ``out`` (float32, [width, T]) when given and the SAE is float32."""
    return _addmm_t(sae, _encoder_input(sae, x), out)
