"""Every architecture against the forward passes of checkpoint.md, written out here.

``encode_dense``, ``encode``/``decode`` (TopK-style), ``forward``, scaling by
``norm_scaling_factor``, ``apply_b_dec_to_input``, leading dimensions and input checks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from kronscope.sae import (
    REGISTRY,
    SAE,
    JumpReLUSAE,
    KronSAE,
    SAEConfig,
    StandardSAE,
    TopKSAE,
    TopKStyleSAE,
    build,
)

D, F, K = 10, 48, 5


def make(arch: str, *, seed: int = 0, dtype: str = "float32", **over: Any) -> SAE:
    kw: dict[str, Any] = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": dtype}
    if arch in ("topk", "kronsae"):
        kw["k"] = K
    if arch == "kronsae":
        kw.update(h=6, m=2, n=4)
    kw.update(over)
    sae = build(SAEConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        sae.W_enc.mul_(2 / D**0.5)
        sae.b_enc.sub_(0.2)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(F, generator=g) * 0.6)
    return sae


def naive_candidates(sae: SAE, x: Tensor) -> Tensor:
    """The value every latent has where it is active (kept, above threshold), [..., F]."""
    cfg = sae.cfg
    pre = naive_pre(sae, x)
    if cfg.architecture != "kronsae":
        return torch.relu(pre)
    assert cfg.h and cfg.m and cfg.n
    a = pre.reshape(*pre.shape[:-1], cfg.h, cfg.m + cfg.n)
    p, q = torch.relu(a[..., : cfg.m]), torch.relu(a[..., cfg.m :])
    return torch.sqrt(p.unsqueeze(-1) * q.unsqueeze(-2)).reshape(*pre.shape[:-1], F)


def naive_pre(sae: SAE, x: Tensor) -> Tensor:
    cfg = sae.cfg
    W, b = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    s = x.double()
    if cfg.normalize_activations == "expected_average_only_in":
        assert cfg.norm_scaling_factor is not None
        s = s * cfg.norm_scaling_factor
    if cfg.apply_b_dec_to_input:
        s = s - sae.b_dec.detach().double()
    return s @ W + b


def naive_dense(sae: SAE, x: Tensor) -> Tensor:
    """checkpoint.md / kronsae.md forward passes, [..., d] -> [..., F], in float64."""
    cfg = sae.cfg
    pre = naive_pre(sae, x)
    if cfg.architecture == "standard":
        return torch.relu(pre)
    if cfg.architecture == "jumprelu":
        assert isinstance(sae, JumpReLUSAE)
        th = sae.threshold.detach().double()
        return torch.where(pre > th, torch.relu(pre), torch.zeros_like(pre))
    if cfg.architecture == "topk":
        assert cfg.k is not None
        top = pre.topk(cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    assert cfg.k
    z = naive_candidates(sae, x)  # kronsae: sqrt(relu(p) * relu(q)), then TopK
    top = z.topk(cfg.k, dim=-1)
    return torch.zeros_like(z).scatter(-1, top.indices, top.values)


def naive_decode(sae: SAE, f: Tensor) -> Tensor:
    x_hat = f.double() @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    if sae.cfg.normalize_activations == "expected_average_only_in":
        assert sae.cfg.norm_scaling_factor is not None
        x_hat = x_hat / sae.cfg.norm_scaling_factor
    return x_hat


ARCHS = ["kronsae", "topk", "jumprelu", "standard"]
VARIANTS = [
    {},
    {"apply_b_dec_to_input": True},
    {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 3.5},
    {
        "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": 0.25,
        "apply_b_dec_to_input": True,
    },
]


def test_registry() -> None:
    assert set(REGISTRY) == set(ARCHS)
    for arch in ARCHS:
        sae = make(arch)
        assert type(sae) is REGISTRY[arch] and sae.architecture == arch
        assert sae.sparse == (arch in ("topk", "kronsae"))
    assert isinstance(make("kronsae"), KronSAE) and isinstance(make("topk"), TopKSAE)
    assert isinstance(make("standard"), StandardSAE)


def test_config_for_another_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="not 'topk'"):
        TopKSAE(SAEConfig("standard", d_in=4, d_sae=8))


@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "b_dec", "scaled", "scaled+b_dec"])
@pytest.mark.parametrize("arch", ARCHS)
def test_encode_dense_and_forward_equal_naive(arch: str, variant: dict[str, Any]) -> None:
    sae = make(arch, seed=1, **variant)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(2))
    f = sae.encode_dense(x)
    expected = naive_dense(sae, x)
    assert f.shape == (3, 7, F)
    assert_close(f.double(), expected, rtol=1e-5, atol=1e-6)
    if arch != "standard":
        assert (f == 0).any(), "the test must exercise the inactive case"
    out = sae(x)
    assert out.x_hat.shape == x.shape
    assert_close(out.x_hat.double(), naive_decode(sae, expected), rtol=1e-5, atol=1e-5)
    assert_close(sae.decode_dense(f).double(), naive_decode(sae, expected), rtol=1e-5, atol=1e-5)
    if sae.sparse:
        assert out.indices is not None and out.values.shape == (3, 7, K)
    else:
        assert out.indices is None
        assert_close(out.values, f)


@pytest.mark.parametrize("arch", ["topk", "kronsae"])
def test_sparse_encode_and_decode(arch: str) -> None:
    sae = make(arch, seed=3, apply_b_dec_to_input=True)
    assert isinstance(sae, TopKStyleSAE)
    x = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(4))
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (4, 6, K)
    assert indices.dtype == torch.int64
    assert bool((values[..., :-1] >= values[..., 1:]).all())
    f = sae.encode_dense(x)
    assert torch.equal(torch.zeros_like(f).scatter(-1, indices, values), f)
    assert_close(sae.decode(values, indices), sae.decode_dense(f))
    # The sparse decode takes any dtype of values and integer indices.
    assert_close(sae.decode(values.double(), indices.int().long()), sae.decode_dense(f))
    # top_latents: a prefix of encode for k' <= k, encode itself beyond.
    top2 = sae.top_latents(x, 2)
    assert torch.equal(top2.values, values[..., :2]) and torch.equal(top2.indices, indices[..., :2])
    assert torch.equal(sae.top_latents(x, K + 3).values, values)


def test_topk_values_are_relu_of_topk_pre_acts() -> None:
    sae = make("topk", seed=5)
    with torch.no_grad():
        sae.b_enc.sub_(1.0)  # so that some of the k kept pre-activations are negative
    assert isinstance(sae, TopKSAE)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(6))
    pre = x @ sae.W_enc + sae.b_enc
    top = pre.topk(K, dim=-1)
    values, indices = sae.encode(x)
    assert_close(values, torch.relu(top.values))
    assert torch.equal(indices, top.indices)
    assert (values == 0).any() and (top.values < 0).any()
    assert_close(sae.pre_acts(x), pre)
    assert_close(sae.pre_acts(x.reshape(5, 6, D)), pre.reshape(5, 6, F))


def test_jumprelu_threshold_is_strict() -> None:
    sae = make("jumprelu", seed=7)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(8))
    assert isinstance(sae, JumpReLUSAE)
    pre = sae.pre_acts(x).detach()
    with torch.no_grad():
        sae.threshold.copy_(pre[0])  # row 0 sits exactly on the threshold: all inactive
    f = sae.encode_dense(x)
    assert torch.equal(f[0], torch.zeros(F))
    assert_close(f[1:], torch.where(pre[1:] > pre[0], pre[1:].relu(), torch.zeros_like(pre[1:])))


def test_standard_is_relu() -> None:
    sae = make("standard", seed=9)
    x = torch.randn(5, D)
    assert_close(sae.encode_dense(x), torch.relu(x @ sae.W_enc + sae.b_enc))
    assert sae.top_latents(x, 3).values.shape == (5, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_expected_average_only_in_scaling(arch: str) -> None:
    # Scaling by c with zero biases: latents of x under factor c equal those of c*x
    # without scaling, and the reconstruction comes back at the model's scale.
    c = 7.0
    scaled = make(
        arch, seed=10, normalize_activations="expected_average_only_in", norm_scaling_factor=c
    )
    plain = make(arch, seed=10)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(11))
    assert_close(scaled.encode_dense(x), plain.encode_dense(c * x))
    assert_close(scaled(x).x_hat, plain(c * x).x_hat / c)
    assert_close(scaled.pre_acts(x), plain.pre_acts(c * x))


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_input_width_is_a_clear_error(arch: str) -> None:
    sae = make(arch)
    for bad in (torch.randn(3, D + 1), torch.randn(2, 3, D - 1), torch.randn(D + 2)):
        with pytest.raises(ValueError, match=rf"d_in = {D}, got shape \[.*{bad.shape[-1]}\]"):
            sae.encode_dense(bad)
        if isinstance(sae, TopKStyleSAE):
            with pytest.raises(ValueError, match=f"d_in = {D}"):
                sae.encode(bad)
        with pytest.raises(ValueError, match=f"d_in = {D}"):
            sae(bad)
        with pytest.raises(ValueError, match=f"d_in = {D}"):
            sae.top_latents(bad, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunking_and_dtypes(arch: str) -> None:
    sae = make(arch, seed=12)
    x = torch.randn(2, 21, D, generator=torch.Generator().manual_seed(13))
    whole = sae.encode_dense(x)
    sae.chunk_size = 4
    assert_close(sae.encode_dense(x), whole)
    # Inputs of another dtype are cast to the parameters' dtype.
    assert_close(sae.encode_dense(x.double()), whole)
    bf = make(arch, seed=12, dtype="bfloat16")
    out = bf(x)
    assert out.x_hat.dtype == torch.bfloat16 and out.x_hat.shape == x.shape
    f = bf.encode_dense(x)
    assert f.dtype == torch.bfloat16
    assert_close(out.x_hat, bf.decode_dense(f), rtol=2e-2, atol=2e-2)
    # bf16 rounding may flip a TopK choice or a threshold, not what a kept latent is worth.
    kept = f != 0
    values = naive_candidates(bf, x.to(torch.bfloat16))
    assert_close(f.double()[kept], values[kept], rtol=2e-2, atol=2e-2)
    agree = (kept == (naive_dense(bf, x.to(torch.bfloat16)) != 0)).double().mean()
    assert agree > 0.98


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_all_parameters(arch: str) -> None:
    sae = make(arch, seed=14)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(15))
    ((sae(x).x_hat - x) ** 2).sum().backward()
    for name, p in sae.named_parameters():
        if name == "threshold":  # a step function: no gradient through the comparison
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
