"""The harvest's transposed encoder: the oneDNN GEMM against the SAE's own pre-activations,
its independence of the chunk's token count, and the addmm fallback."""

from __future__ import annotations

import pytest
import torch
from harvest_ref import tiny_sae

import kronscope.harvest.encoder as encoder_mod
from kronscope.harvest.encoder import TransposedEncoder, pre_acts_t

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


def _sae(**overrides):
    sae = tiny_sae("kronsae", **overrides)
    with torch.no_grad():  # every term of the affine map non-trivial
        sae.b_dec.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
    return sae


@needs_onednn
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"apply_b_dec_to_input": False},
        {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 0.37},
    ],
)
def test_onednn_path_matches_pre_acts(overrides):
    sae = _sae(**overrides)
    enc = TransposedEncoder(sae)
    assert enc.onednn  # the CPU wheels carry oneDNN: the fast path must be the one taken
    x = torch.randn(70, sae.d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = enc(x)
        expect = sae.pre_acts(x).t()
    assert got.shape == (sae.h * (sae.m + sae.n), 70) and got.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_columns_do_not_depend_on_the_chunk():
    """A token's values are the same bits whatever else is in its chunk (the last, shorter
    chunk of a run; another shard's batches), and with any thread count."""
    sae = _sae()
    enc = TransposedEncoder(sae)
    x = torch.randn(300, sae.d_in, generator=torch.Generator().manual_seed(1))
    whole = enc(x)
    assert torch.equal(whole[:, :128], enc(x[:128]))
    assert torch.equal(whole[:, 128:131], enc(x[128:131]))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(whole, enc(x))
    finally:
        torch.set_num_threads(n)


def test_fallback_is_addmm(monkeypatch):
    monkeypatch.setattr(encoder_mod, "_mkldnn_ops_work", lambda: False)
    sae = _sae()
    enc = TransposedEncoder(sae)
    assert not enc.onednn
    x = torch.randn(40, sae.d_in, generator=torch.Generator().manual_seed(2))
    out = torch.full((sae.h * (sae.m + sae.n), 40), float("nan"))
    got = enc(x, out)
    assert got.data_ptr() == out.data_ptr()  # into the caller's buffer
    assert torch.equal(got, pre_acts_t(sae, x))


def test_other_dtypes_use_addmm():
    sae = _sae().to(torch.bfloat16)
    enc = TransposedEncoder(sae)
    assert not enc.onednn
    x = torch.randn(20, sae.d_in, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = enc(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sae.pre_acts(x).t().float())
