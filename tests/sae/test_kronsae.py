"""KronSAE: mAND, coordinates, the head-pruned exact TopK, its gradients, memory, init.

The fast path (``encode``) is compared with the dense reference (``encode_reference``,
TopK over all F composed latents) and both with formulas written out here from
kronsae.md. Ties: where several latents share the k-th value, either may be kept, so a
result is checked as *a* valid TopK (same values, distinct indices whose dense values are
the reported ones) and indices are compared one to one only where a value is positive and
unique in its row.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kronscope.sae import COMPOSITIONS, KronSAE, SAEConfig, compose, mand
from kronscope.sae.kronsae import safe_sqrt


def make_kron(
    h: int,
    m: int,
    n: int,
    k: int,
    *,
    d: int = 12,
    composition: str = "mand",
    seed: int = 0,
    dtype: str = "float32",
    shift: float = -0.5,
) -> KronSAE:
    """A KronSAE with O(1) pre-activations; ``shift`` < 0 makes many parents zero."""
    cfg = SAEConfig(
        "kronsae", d_in=d, d_sae=h * m * n, k=k, h=h, m=m, n=n, composition=composition, dtype=dtype
    )
    sae = KronSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    sae.init_weights(g)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) / d**0.5)
        sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=g) * 0.5 + shift)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.1)
    return sae


def naive_latents(sae: KronSAE, x: Tensor) -> Tensor:
    """kronsae.md written out: [..., d] -> [..., F] composed values (float64 loops)."""
    h, m, n, d = sae.h, sae.m, sae.n, sae.d_in
    rows = x.reshape(-1, d).double()
    W, b = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    out = torch.zeros(rows.shape[0], sae.d_sae, dtype=torch.float64)
    a = rows @ W + b
    for r in range(rows.shape[0]):
        for g in range(h):
            blk = a[r, g * (m + n) : (g + 1) * (m + n)]
            for i in range(m):
                for j in range(n):
                    u, v = float(blk[i]), float(blk[m + j])
                    if sae.composition == "mand":
                        z = math.sqrt(u * v) if u > 0 and v > 0 else 0.0
                    elif sae.composition == "relu_product":
                        z = max(u, 0.0) * max(v, 0.0)
                    else:
                        z = u * v
                    out[r, g * m * n + i * n + j] = z
    return out.reshape(*x.shape[:-1], sae.d_sae)


def assert_valid_topk(dense: Tensor, ref_values: Tensor, values: Tensor, indices: Tensor) -> None:
    """``(values, indices)`` is a TopK of ``dense`` [..., F] whose values are ``ref_values``."""
    assert values.shape == indices.shape == ref_values.shape
    assert indices.dtype == torch.int64
    assert_close(values, ref_values, rtol=0, atol=0)
    assert bool((values[..., :-1] >= values[..., 1:]).all()), "values must be largest first"
    assert bool(((indices >= 0) & (indices < dense.shape[-1])).all())
    srt = indices.sort(-1).values
    assert bool((srt[..., 1:] != srt[..., :-1]).all()), "indices must be distinct"
    assert_close(dense.gather(-1, indices), values, rtol=0, atol=0)


def unique_positive(values: Tensor, dense: Tensor) -> Tensor:
    """Mask of kept entries > 0 whose value no other latent of the row has (no tie)."""
    eq = values.unsqueeze(-1) == dense.unsqueeze(-2)  # [..., k, F]
    return (values > 0) & (eq.sum(-1) == 1)


def check_against_reference(sae: KronSAE, x: Tensor) -> tuple[Tensor, Tensor]:
    values, indices = sae.encode(x)
    ref_values, ref_indices = sae.encode_reference(x)
    dense = sae.all_latents(x)
    assert_valid_topk(dense, ref_values, values, indices)
    keep = unique_positive(ref_values, dense)
    assert torch.equal(indices[keep], ref_indices[keep])
    fast_dense = sae.encode_dense(x)
    assert torch.equal(fast_dense, torch.zeros_like(dense).scatter(-1, indices, values))
    ref_dense = torch.zeros_like(dense).scatter(-1, ref_indices, ref_values)
    # The two may differ only where a latent ties with the k-th value (either may be kept).
    differ = fast_dense != ref_dense
    kth = ref_values[..., -1:].expand_as(dense)
    assert torch.equal(dense[differ], kth[differ])
    return values, indices


# -- mAND and the compositions -------------------------------------------------------------


def naive_mand(u: float, v: float) -> tuple[float, float, float]:
    """Value, d/du and d/dv of mAND, from the definition."""
    if u > 0 and v > 0:
        return math.sqrt(u * v), 0.5 * math.sqrt(v / u), 0.5 * math.sqrt(u / v)
    return 0.0, 0.0, 0.0


GRID = [-2.0, -0.5, -1e-30, 0.0, 1e-30, 1e-6, 0.3, 1.0, 4.0, 1e6]


def grid_pairs(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    u = torch.tensor([a for a in GRID for _ in GRID], dtype=dtype)
    v = torch.tensor([b for _ in GRID for b in GRID], dtype=dtype)
    return u, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mand_values_and_gradients_match_naive(dtype: torch.dtype) -> None:
    u, v = grid_pairs(dtype)
    u.requires_grad_(True)
    v.requires_grad_(True)
    z = mand(u, v)
    z.sum().backward()
    assert u.grad is not None and v.grad is not None
    for a, b, val, du, dv in zip(
        u.tolist(), v.tolist(), z.tolist(), u.grad.tolist(), v.grad.tolist(), strict=True
    ):
        if dtype == torch.float32 and 0 < abs(a * b) < 1e-37:
            assert val == 0.0  # u*v underflows in float32 (sqrt of the product, as the paper)
            continue
        ev, edu, edv = naive_mand(a, b)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert math.isclose(val, ev, rel_tol=tol, abs_tol=0), (a, b)
        assert math.isclose(du, edu, rel_tol=tol, abs_tol=0), (a, b, du, edu)
        assert math.isclose(dv, edv, rel_tol=tol, abs_tol=0), (a, b, dv, edv)


def test_mand_zero_cases_have_exactly_zero_gradient() -> None:
    u = torch.tensor([0.0, -1.0, 0.0, 2.0, -3.0, 0.0, 5.0, -0.0], requires_grad=True)
    v = torch.tensor([0.0, 0.0, 3.0, 0.0, -1.0, -2.0, -7.0, 1.0], requires_grad=True)
    z = mand(u, v)
    assert torch.equal(z, torch.zeros_like(z))
    (z * torch.arange(1.0, 9.0)).sum().backward()
    assert u.grad is not None and v.grad is not None
    assert torch.equal(u.grad, torch.zeros_like(u)), u.grad
    assert torch.equal(v.grad, torch.zeros_like(v)), v.grad


def test_mand_gradient_formula() -> None:
    u = torch.tensor([0.25, 4.0, 1e-4], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0, 9.0, 1e4], dtype=torch.float64, requires_grad=True)
    mand(u, v).sum().backward()
    assert u.grad is not None
    assert_close(u.grad, 0.5 * torch.sqrt(v.detach() / u.detach()))


def test_mand_gradcheck_on_positive_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    u = (torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    v = (torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(mand, (u, v))
    assert torch.autograd.gradgradcheck(mand, (u, v))
    for comp in COMPOSITIONS:
        p = (torch.rand(2, 4, 2, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
        q = (torch.rand(2, 4, 3, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b, c=comp: compose(a, b, c), (p, q))


def test_safe_sqrt() -> None:
    x = torch.tensor([-1.0, 0.0, 0.25, 4.0], requires_grad=True)
    y = safe_sqrt(x)
    assert_close(y, torch.tensor([0.0, 0.0, 0.5, 2.0]))
    y.sum().backward()
    assert x.grad is not None
    assert_close(x.grad, torch.tensor([0.0, 0.0, 1.0, 0.25]), rtol=0, atol=0)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_compose_values_and_gradients_match_naive(composition: str) -> None:
    # compose: p [..., m], q [..., n] -> [..., m, n]; here m = n = len(GRID).
    p = torch.tensor(GRID, dtype=torch.float64).repeat(2, 1).requires_grad_(True)
    q = torch.tensor(GRID[::-1], dtype=torch.float64).repeat(2, 1).requires_grad_(True)
    z = compose(p, q, composition)
    assert z.shape == (2, len(GRID), len(GRID))
    weights = torch.linspace(0.5, 1.5, z.numel(), dtype=torch.float64).reshape(z.shape)
    (z * weights).sum().backward()
    assert p.grad is not None and q.grad is not None
    exp_z = torch.zeros_like(z)
    exp_dp, exp_dq = torch.zeros_like(p), torch.zeros_like(q)
    for r in range(2):
        for i, a in enumerate(p[r].tolist()):
            for j, b in enumerate(q[r].tolist()):
                w = float(weights[r, i, j])
                if composition == "mand":
                    val, da, db = naive_mand(a, b)
                elif composition == "relu_product":
                    val = max(a, 0.0) * max(b, 0.0)
                    da = max(b, 0.0) if a > 0 else 0.0
                    db = max(a, 0.0) if b > 0 else 0.0
                else:
                    val, da, db = a * b, b, a
                exp_z[r, i, j] = val
                exp_dp[r, i] += w * da
                exp_dq[r, j] += w * db
    assert_close(z.detach(), exp_z, rtol=1e-12, atol=0)
    assert_close(p.grad, exp_dp, rtol=1e-12, atol=1e-300)
    assert_close(q.grad, exp_dq, rtol=1e-12, atol=1e-300)
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()


def test_relu_product_zero_cases_have_exactly_zero_gradient() -> None:
    p = torch.tensor([[0.0, -1.0, 2.0]], requires_grad=True)
    q = torch.tensor([[0.0, -3.0]], requires_grad=True)
    z = compose(p, q, "relu_product")
    assert torch.equal(z, torch.zeros_like(z))
    z.sum().backward()
    assert p.grad is not None and q.grad is not None
    assert torch.equal(p.grad, torch.zeros_like(p))
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_unknown_composition() -> None:
    with pytest.raises(ValueError, match="unknown composition"):
        compose(torch.ones(2), torch.ones(3), "max")


# -- coordinates ----------------------------------------------------------------------------


SHAPES = [(1, 1, 1), (3, 2, 5), (4, 3, 3), (2, 1, 4), (5, 2, 2)]


@pytest.mark.parametrize(("h", "m", "n"), SHAPES)
def test_flat_index_round_trip_and_layout(h: int, m: int, n: int) -> None:
    sae = make_kron(h, m, n, k=1, d=6)
    seen = []
    for index in range(h * m * n):
        g, i, j = sae.coordinates(index)
        assert 0 <= g < h and 0 <= i < m and 0 <= j < n
        assert index == g * (m * n) + i * n + j
        assert sae.index_of(g, i, j) == index
        seen.append((g, i, j))
    assert len(set(seen)) == h * m * n
    # int-like inputs (numpy/torch scalars) are accepted
    last = torch.tensor(h * m * n - 1)
    assert sae.coordinates(last) == (h - 1, m - 1, n - 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("h", "m", "n"), SHAPES)
def test_layout_matches_decoder_rows_and_composed_latents(h: int, m: int, n: int) -> None:
    sae = make_kron(h, m, n, k=1, d=6, seed=3)
    sae.init_weights(torch.Generator().manual_seed(4))
    # Decoder row of latent (g, i, j) is the normalised sum of its parents' encoder columns.
    W = sae.W_enc.detach()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(5))
    p, q = sae.parents(x)
    latents = sae.all_latents(x)
    for g in range(h):
        for i in range(m):
            for j in range(n):
                index = sae.index_of(g, i, j)
                row = W[:, g * (m + n) + i] + W[:, g * (m + n) + m + j]
                assert_close(sae.W_dec[index].detach(), row / row.norm())
                assert_close(latents[:, index], mand(p[:, g, i], q[:, g, j]), rtol=0, atol=0)
    # One-hot decode picks the same row.
    index = sae.index_of(h - 1, m - 1, 0)
    x_hat = sae.decode(torch.ones(1, 1), torch.tensor([[index]]))
    assert_close(x_hat[0], (sae.W_dec[index] + sae.b_dec).detach())


@pytest.mark.parametrize(("h", "m", "n"), SHAPES)
def test_siblings(h: int, m: int, n: int) -> None:
    sae = make_kron(h, m, n, k=1, d=6)
    for index in range(h * m * n):
        g, i, j = sae.coordinates(index)
        rows = sae.row_siblings(index)
        cols = sae.column_siblings(index)
        assert len(rows) == n - 1 and len(cols) == m - 1
        assert index not in rows and index not in cols
        assert {sae.coordinates(r)[:2] for r in rows} <= {(g, i)}
        assert {(sae.coordinates(c)[0], sae.coordinates(c)[2]) for c in cols} <= {(g, j)}
        assert sorted([*rows, index]) == sae.base_children(g, i)
        assert sorted([*cols, index]) == sae.extension_children(g, j)
        assert rows == sorted(rows) and cols == sorted(cols)


def test_out_of_range_is_an_index_error_with_a_message() -> None:
    sae = make_kron(3, 2, 4, k=1, d=6)
    for bad in (-1, 24, 10**9):
        with pytest.raises(IndexError, match=r"out of range 0\.\.23"):
            sae.coordinates(bad)
        with pytest.raises(IndexError, match="out of range"):
            sae.row_siblings(bad)
        with pytest.raises(IndexError, match="out of range"):
            sae.column_siblings(bad)
    for coords in ((3, 0, 0), (0, 2, 0), (0, 0, 4), (-1, 0, 0), (0, -1, 0), (0, 0, -1)):
        with pytest.raises(IndexError, match=r"\(h=3, m=2, n=4\)"):
            sae.index_of(*coords)


# -- the head-pruned encode equals the dense reference ----------------------------------------

# (h, m, n, k): k < h, k == h, k > h, k == F, k == 1, m == 1, m == n.
CASES = [
    (8, 2, 4, 3),
    (6, 1, 3, 6),
    (4, 2, 2, 6),
    (3, 1, 2, 6),
    (2, 4, 8, 1),
    (16, 2, 4, 5),
    (5, 3, 3, 7),
    (7, 1, 1, 4),
    (12, 2, 2, 48),
]


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize(("h", "m", "n", "k"), CASES)
def test_encode_equals_reference(composition: str, h: int, m: int, n: int, k: int) -> None:
    for seed in range(6):
        shift = (-1.0, -0.5, 0.0)[seed % 3]
        sae = make_kron(h, m, n, k, composition=composition, seed=seed, shift=shift)
        x = torch.randn(19, sae.d_in, generator=torch.Generator().manual_seed(100 + seed))
        x[3] = 0  # only the biases: with a negative shift most parents of this row are zero
        check_against_reference(sae, x)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_reference_and_encode_equal_the_written_out_formula(composition: str) -> None:
    sae = make_kron(5, 2, 4, 6, composition=composition, seed=11)
    x = torch.randn(9, sae.d_in, generator=torch.Generator().manual_seed(12))
    naive = naive_latents(sae, x)
    assert_close(sae.all_latents(x).double(), naive, rtol=1e-5, atol=1e-6)
    values, indices = sae.encode(x)
    exp = naive.topk(sae.k, dim=-1)
    assert_close(values.double(), exp.values, rtol=1e-5, atol=1e-6)
    keep = unique_positive(exp.values, naive)
    assert torch.equal(indices[keep], exp.indices[keep])


def test_all_parents_inactive_gives_zero_values() -> None:
    sae = make_kron(6, 2, 4, 4, shift=-100.0)
    x = torch.randn(5, sae.d_in)
    values, indices = sae.encode(x)
    assert torch.equal(values, torch.zeros_like(values))
    assert indices.shape == (5, 4)
    assert torch.equal(sae.encode_dense(x), torch.zeros(5, sae.d_sae))
    values.sum().backward()  # a zero value has a zero (not NaN) gradient
    assert sae.W_enc.grad is not None and torch.equal(sae.W_enc.grad, torch.zeros_like(sae.W_enc))


def test_product_bound_with_negative_heads() -> None:
    # p < 0 < q: every product is negative and a head's maximum is max(p) * min(q), a
    # corner that "max*max or min*min" misses. Head 0: p = (-1, -2), q = (0.1, 10): best
    # -0.1, but min*min = -0.2 would rank it below head 1 (all products -0.15).
    sae = make_kron(2, 2, 2, 1, composition="product", d=4)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([-1.0, -2.0, 0.1, 10.0, -1.5, -1.5, 0.1, 0.1]))
    values, indices = check_against_reference(sae, torch.zeros(1, 4))
    assert_close(values, torch.tensor([[-0.1]]))
    assert indices.tolist() == [[sae.index_of(0, 0, 0)]]
    # The same with many random heads, k well below h.
    for seed in range(4):
        sae = make_kron(16, 2, 3, 2, composition="product", seed=seed)
        with torch.no_grad():
            b = sae.b_enc.view(16, 5)
            b[:, :2] -= 3.0
            b[:, 2:] += 3.0
        x = torch.randn(8, sae.d_in, generator=torch.Generator().manual_seed(seed))
        values, _ = check_against_reference(sae, x)
        assert bool((values < 0).any())


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_head_bounds_in_row_blocks(composition: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import kronscope.sae.kronsae as mod

    sae = make_kron(8, 2, 4, 3, composition=composition, seed=5)
    x = torch.randn(23, sae.d_in, generator=torch.Generator().manual_seed(6))
    whole = sae.encode(x)
    monkeypatch.setattr(mod, "_BOUND_ELEMS", 5 * sae.h)  # blocks of 5 rows
    blocked = check_against_reference(sae, x)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


def test_leading_dimensions() -> None:
    sae = make_kron(8, 2, 4, 5, seed=7)
    x = torch.randn(3, 4, sae.d_in, generator=torch.Generator().manual_seed(8))
    values, indices = check_against_reference(sae, x)
    assert values.shape == indices.shape == (3, 4, 5)
    flat_v, flat_i = sae.encode(x.reshape(12, -1))
    assert torch.equal(values.reshape(12, 5), flat_v)
    assert torch.equal(indices.reshape(12, 5), flat_i)
    p, q = sae.parents(x)
    assert p.shape == (3, 4, 8, 2) and q.shape == (3, 4, 8, 4)
    assert sae.encode_dense(x).shape == (3, 4, sae.d_sae)
    assert sae.all_latents(x).shape == (3, 4, sae.d_sae)
    # A single token without a batch dimension.
    v1, _ = sae.encode(x[1, 2])
    assert v1.shape == (5,)
    assert_close(v1, values[1, 2])


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_chunking(composition: str) -> None:
    sae = make_kron(8, 2, 4, 5, composition=composition, seed=9)
    x = torch.randn(2, 23, sae.d_in, generator=torch.Generator().manual_seed(10))
    whole_v, whole_i = sae.encode(x)
    whole_dense = sae.encode_dense(x)
    sae.chunk_size = 4
    values, indices = check_against_reference(sae, x)
    # Chunks are independent: the result is the concatenation of per-chunk encodes, exactly.
    flat = x.reshape(-1, sae.d_in)
    parts = [sae._encode_sparse(c) for c in flat.split(4)]
    assert torch.equal(values.reshape(-1, 5), torch.cat([v for v, _ in parts]))
    assert torch.equal(indices.reshape(-1, 5), torch.cat([i for _, i in parts]))
    # Against the unchunked encode: BLAS may round a 4-row GEMM differently in the last
    # bit, so values agree to rounding and the dense latents to the same.
    assert_close(values, whole_v)
    assert_close(sae.encode_dense(x), whole_dense)
    keep = unique_positive(whole_v, sae.all_latents(x))
    assert torch.equal(indices[keep], whole_i[keep])
    p, q = sae.parents(x)
    sae.chunk_size = 10_000
    p2, q2 = sae.parents(x)
    assert_close(p, p2)
    assert_close(q, q2)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_bfloat16_parameters(composition: str) -> None:
    for seed in range(3):
        sae = make_kron(8, 2, 4, 6, composition=composition, seed=seed, dtype="bfloat16")
        assert sae.W_enc.dtype == torch.bfloat16
        x = torch.randn(17, sae.d_in, generator=torch.Generator().manual_seed(seed))
        values, _ = check_against_reference(sae, x)  # float32 input is cast to bf16
        assert values.dtype == torch.bfloat16
        x_hat = sae(x).x_hat
        assert x_hat.dtype == torch.bfloat16 and x_hat.shape == x.shape


def encoder_grads(sae: KronSAE, fn: Any, x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of sum(values * weights) w.r.t. W_enc and b_enc."""
    sae.zero_grad(set_to_none=True)
    values, _ = fn(x)
    (values * weights).sum().backward()
    assert sae.W_enc.grad is not None and sae.b_enc.grad is not None
    return sae.W_enc.grad.clone(), sae.b_enc.grad.clone()


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize(
    ("h", "m", "n", "k"), [(8, 2, 4, 3), (4, 2, 2, 6), (6, 1, 3, 6), (3, 1, 2, 6)]
)
def test_gradients_equal_reference(composition: str, h: int, m: int, n: int, k: int) -> None:
    for seed in range(3):
        sae = make_kron(h, m, n, k, composition=composition, seed=seed)
        sae.chunk_size = 7
        x = torch.randn(2, 9, sae.d_in, generator=torch.Generator().manual_seed(seed))
        weights = torch.randn(2, 9, k, generator=torch.Generator().manual_seed(50 + seed))

        ref_values, _ = sae.encode_reference(x)
        nonzero = ref_values[ref_values != 0]
        assert nonzero.unique().numel() == nonzero.numel(), "pick a seed without ties"
        g_fast = encoder_grads(sae, sae.encode, x, weights)
        g_ref = encoder_grads(sae, sae.encode_reference, x, weights)
        for a, b in zip(g_fast, g_ref, strict=True):
            assert torch.isfinite(a).all()
            assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert sae.W_dec.grad is None  # encode does not touch the decoder


def test_gradients_flow_through_forward_and_parents() -> None:
    sae = make_kron(8, 2, 4, 5, seed=4)
    x = torch.randn(6, sae.d_in, requires_grad=True)
    out = sae(x)
    (out.x_hat**2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0


# -- memory: the pruned path never forms B x F values ---------------------------------------


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op returns (numel) and the op that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_encode_does_not_materialise_all_latents(grad: bool) -> None:
    # F = 8192, k*m*n = 1024 and h*(m+n) = 1536 per row: both far below F.
    h, m, n, k, B = 64, 8, 16, 8, 16
    sae = make_kron(h, m, n, k, d=8, seed=0)
    x = torch.randn(B, sae.d_in)
    F = sae.d_sae
    with torch.set_grad_enabled(grad):
        with LargestOutput() as spy:
            values, _ = sae.encode(x)
            if grad:
                values.sum().backward()
        assert spy.numel <= B * max(h * (m + n), k * m * n, 1), spy.op
        assert spy.numel < B * F / 4, (spy.numel, spy.op)
        with LargestOutput() as ref_spy:  # the spy does see a dense pass
            sae.encode_reference(x)
        assert ref_spy.numel >= B * F


# -- initialisation (appendix A) ---------------------------------------------------------------


def test_init_weights() -> None:
    h, m, n, d = 64, 2, 4, 48
    sae = make_kron(h, m, n, k=8, d=d)
    sae.init_weights(torch.Generator().manual_seed(0))
    F = h * m * n
    W = sae.W_enc.detach()
    assert abs(W.std().item() * math.sqrt(2 * F) - 1) < 0.05
    assert abs(W.mean().item()) < 0.05 / math.sqrt(2 * F) * 10
    assert torch.equal(sae.b_enc, torch.zeros_like(sae.b_enc))
    assert torch.equal(sae.b_dec, torch.zeros_like(sae.b_dec))
    assert_close(sae.W_dec.norm(dim=-1), torch.ones(F))
    cols = W.T.reshape(h, m + n, d)
    P, Q = cols[:, :m], cols[:, m:]
    expected = (P[:, :, None, :] + Q[:, None, :, :]).reshape(F, d)
    assert_close(sae.W_dec.detach(), expected / expected.norm(dim=-1, keepdim=True))
    # Seeded: the same generator seed gives the same weights.
    again = make_kron(h, m, n, k=8, d=d, seed=99)
    again.init_weights(torch.Generator().manual_seed(0))
    assert torch.equal(again.W_enc, sae.W_enc) and torch.equal(again.W_dec, sae.W_dec)


def test_init_weights_bfloat16() -> None:
    sae = make_kron(4, 2, 2, k=2, d=8, dtype="bfloat16")
    sae.init_weights(torch.Generator().manual_seed(0))
    assert sae.W_dec.dtype == torch.bfloat16
    assert_close(sae.W_dec.float().norm(dim=-1), torch.ones(16), rtol=1e-2, atol=1e-2)
