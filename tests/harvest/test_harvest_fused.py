"""The fused (numba) bookkeeping against the torch path: the same state, tensor for tensor.

Random activations go straight into ``Harvester.process_activations`` (no model), coarsely
rounded so that many values tie (equal context maxima, equal parents), with repeated
contexts, special tokens, several chunk sizes and enough batches for the reservoirs and
top lists to fill and then be replaced. Everything must be equal exactly, per-token rows
and their slots included; only the sums may differ by rounding (the torch path adds each
chunk in float32, the kernel in float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harvest_ref import TINY_D, tiny_sae

from kronscope.harvest import Harvester, HarvestError, HarvestParams
from kronscope.harvest.compute import load_fused
from kronscope.harvest.state import HarvestState
from kronscope.harvest.streaming import row_peak

pytestmark = pytest.mark.skipif(load_fused() is None, reason="numba is not installed")

L = 8
PARAMS = HarvestParams(examples=3, samples=4, batch_size=6, seed=5)
CASES = [
    ("kronsae", {}),
    ("kronsae", {"h": 16, "d_sae": 128, "k": 3}),  # k < h: the TopK picks heads
    ("kronsae", {"h": 16, "d_sae": 128, "k": 3, "composition": "relu_product"}),
    ("kronsae", {"composition": "product"}),
    ("topk", {}),
    ("jumprelu", {}),
    ("standard", {}),
]


def activations(n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[(index [B], acts [B, L, d], special [B, L])] with ties and repeated contexts."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    B = PARAMS.batch_size
    for b in range(n_batches):
        acts = torch.randn(B, L, TINY_D, generator=gen)
        acts = (acts * 2).round() / 2  # a coarse grid: many equal parents and maxima
        acts[1] = acts[0]  # two contexts alike: their maxima tie, the context decides
        special = torch.rand(B, L, generator=gen) < 0.15
        special[:, 0] = True
        out.append((torch.arange(b * B, (b + 1) * B), acts, special))
    return out


def run(arch: str, overrides: dict, fused: bool, chunk_elements: int, batches) -> HarvestState:
    sae = tiny_sae(arch, **overrides)
    h = Harvester(sae, None, PARAMS, ctx_len=L, chunk_elements=chunk_elements, fused=fused)  # type: ignore[arg-type]
    assert h.fused is fused
    assert h.prepare() >= 0.0
    state = h.new_state()
    for index, acts, special in batches:
        h.process_activations(state, index, acts, special)
    return state


@pytest.mark.parametrize(("arch", "overrides"), CASES)
@pytest.mark.parametrize("chunk_elements", [1, 200, 1 << 23])
def test_fused_equals_torch_path(arch, overrides, chunk_elements):
    batches = activations(12, seed=len(arch) + chunk_elements % 97)
    ref = run(arch, overrides, False, chunk_elements, batches)
    got = run(arch, overrides, True, chunk_elements, batches)
    ref_t, got_t = ref.tensors(), got.tensors()
    assert ref_t.keys() == got_t.keys()
    for name, t in ref_t.items():
        if name.endswith(".total"):
            torch.testing.assert_close(got_t[name], t, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got_t[name], t), name
    assert got.counters() == ref.counters()
    # the case is not trivial: entries were replaced, ties were met
    assert int((ref.latent.top.ctx >= 0).sum()) > ref.latent.units
    assert int(ref.latent.moments.n_active.sum()) > 0
    if ref.both_parents_active is not None:
        assert int(ref.both_parents_active.sum()) > 0


def test_many_candidates_at_once():
    """One big batch: every unit gets far more reservoir candidates than it keeps (the
    kernel keeps the best per unit while it scans, the torch path truncates in offer)."""
    params = HarvestParams(examples=2, samples=3, batch_size=64, seed=1)
    gen = torch.Generator().manual_seed(3)
    acts = torch.randn(64, L, TINY_D, generator=gen)
    special = torch.zeros(64, L, dtype=torch.bool)
    states = []
    for fused in (False, True):
        h = Harvester(tiny_sae("kronsae"), None, params, ctx_len=L, fused=fused)  # type: ignore[arg-type]
        state = h.new_state()
        h.process_activations(state, torch.arange(64), acts, special)
        states.append(state.tensors())
    for name, t in states[0].items():
        if name.endswith(".total"):
            torch.testing.assert_close(states[1][name], t, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(states[1][name], t), name


def test_fused_flag():
    sae = tiny_sae("topk")
    assert Harvester(sae, None, PARAMS, ctx_len=L).fused  # type: ignore[arg-type]
    h = Harvester(sae, None, PARAMS, ctx_len=L, fused=False)  # type: ignore[arg-type]
    assert not h.fused
    assert h.prepare() == 0.0


def test_fused_required_without_numba(monkeypatch):
    import kronscope.harvest.compute as compute

    monkeypatch.setattr(compute, "load_fused", lambda: None)
    sae = tiny_sae("topk")
    assert not Harvester(sae, None, PARAMS, ctx_len=L).fused  # type: ignore[arg-type]
    with pytest.raises(HarvestError, match="numba"):
        Harvester(sae, None, PARAMS, ctx_len=L, fused=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("with_pos", [False, True])
def test_offer_merge_equals_keyed_top(with_pos):
    """The kernel's merge against ``KeyedTop.offer`` over rounds of random candidates:
    few per unit, none for some units, and more than its insertion sort takes."""
    from kronscope.harvest.streaming import KeyedTop

    U, K, length = 6, 4, 3
    h = Harvester(tiny_sae("topk"), None, PARAMS, ctx_len=L, fused=True)  # type: ignore[arg-type]
    ref, got = KeyedTop(U, K, length), KeyedTop(U, K, length)
    gen = torch.Generator().manual_seed(11)
    used = torch.randperm(1 << 20, generator=gen)  # unique keys across all rounds
    taken = 0
    for n in (3, 10, 0, 200, 7, 50, 1, 300):
        unit = torch.randint(0, U, (n,), generator=gen)
        if n == 200:
            unit[:] = 2  # one unit with very many candidates
        key = used[taken : taken + n].to(torch.int64) - (1 << 19)
        taken += n
        ctx = torch.randint(0, 1000, (n,), generator=gen)
        # values float16 clips (1e5), rounds to subnormals (1e-6) or to zero (1e-9)
        scale = torch.tensor([1.0, 1e5, 1e-6, 1e-9])[
            torch.randint(0, 4, (n, length), generator=gen)
        ]
        table = torch.randn(n, length, generator=gen) * scale
        pos = torch.randint(0, length, (n,), generator=gen) if with_pos else None
        value = torch.randn(n, generator=gen) if with_pos else None
        ref.offer(unit, key, ctx, value, lambda ids, t=table: t[ids], pos)
        h._offer(got, unit, key, ctx, value, h._put_rows(table, clamp=False)(torch.arange(n)), pos)
        for name in KeyedTop.FIELDS:
            assert torch.equal(getattr(got, name), getattr(ref, name)), (n, name)


@pytest.mark.parametrize("composition", ["mand", "relu_product"])
@pytest.mark.parametrize(
    ("h", "m", "n", "k", "T"),
    [(2048, 2, 4, 32, 40), (64, 2, 4, 8, 100), (7, 3, 2, 12, 33), (5, 1, 1, 5, 16)],
)
def test_kron_topk_kernel_equals_torch(composition, h, m, n, k, T):
    """The kernel's TopK against ``kron_topk_t`` and against the SAE's own ``encode`` on
    raw pre-activations (the kernel applies the ReLU): the same latents, the same values
    in the same order (random values: no ties)."""
    from kronscope.harvest.compute import kron_topk_t
    from kronscope.sae.kronsae import safe_sqrt

    kernels = load_fused()
    gen = torch.Generator().manual_seed(h + k)
    a = torch.randn(h * (m + n), T, generator=gen)
    a[:, 0] = -1.0  # a token with no active parent: every bound and value is zero
    bound = np.zeros((h, T), np.float32)
    _dense_bound(kernels, a, m, n, bound)
    av = a.relu().view(h, m + n, T)
    ref_bound = av[:, :m].amax(1) * av[:, m:].amax(1)
    assert torch.equal(torch.from_numpy(bound), ref_bound)
    values = np.zeros((T, k), np.float32)
    indices = np.zeros((T, k), np.int64)
    kernels.kron_topk(a.numpy(), bound, m, n, values, indices)
    got_v = torch.from_numpy(values)
    got_v = safe_sqrt(got_v) if composition == "mand" else got_v
    ref_v, ref_i = kron_topk_t(a.relu(), h, m, n, k, composition)
    assert torch.equal(got_v, ref_v)
    live = ref_v[1:] > 0  # zero values: inactive, which latents is open (torch: any)
    assert torch.equal(torch.from_numpy(indices)[1:][live], ref_i[1:][live])
    assert int(live.sum()) >= T  # the case is not trivial


def _dense_bound(kernels, a: torch.Tensor, m: int, n: int, bound: np.ndarray) -> None:
    """Run ``dense_pass`` on parents ``a`` for its bounds alone (throwaway state)."""
    U, T = a.shape
    L = T
    z64 = lambda *shape: np.zeros(shape, np.int64)  # noqa: E731
    kernels.dense_pass(
        a.numpy(),
        a.numpy().view(np.int32),
        m + n,
        m,
        L,
        z64(1),
        z64(T),
        np.full(U, 1 << 62),
        np.full(U, 1 << 62),
        20,
        0,
        z64(U),
        np.zeros(U, np.float64),
        np.zeros(U, np.int32),
        np.zeros((U, 4), np.int32),
        z64(U // (m + n) * m * n),
        bound,
        z64(U, 1),
        z64(U, 1),
        z64(U),
        z64(U, 2),
        z64(U, 2),
        z64(U),
    )


def test_kron_topk_ties_go_to_the_lower_index():
    """Equal bounds: the lower head; equal pairs: the lower latent."""
    kernels = load_fused()
    h, m, n, T = 4, 1, 2, 1
    # heads 1 and 3 tie on the bound (2 * 3); head 0 lower, head 2 higher; in head 2 the
    # two pairs tie (1 * 4 and 1 * 4)
    a = torch.tensor([[1.0, 1.0, 1.0], [2.0, 3.0, 1.0], [1.0, 4.0, 4.0], [3.0, 2.0, 1.0]])
    a = a.reshape(h * (m + n), T)
    bound = np.zeros((h, T), np.float32)
    _dense_bound(kernels, a, m, n, bound)
    values = np.zeros((T, 3), np.float32)
    indices = np.zeros((T, 3), np.int64)
    kernels.kron_topk(a.numpy(), bound, m, n, values, indices)
    # k = 3 < h: heads 2, 1, 3 (1 before 3); latents of head g are 2g, 2g + 1
    assert values[0].tolist() == [6.0, 6.0, 4.0]
    assert indices[0].tolist() == [2, 6, 4]


def test_put_rows_float16_equals_torch():
    """The kernels' float16 conversion against torch's (clipped as ``codec.pack_f16``):
    every bit pattern around each rounding boundary, both signs, and a million random
    ones; with ``clamp``, values <= 0 (and -0.0) are stored as +0. (Checked once over
    every finite float32 too: no difference.)"""
    kernels = load_fused()
    gen = np.random.default_rng(0)
    edges = [0, 0x33000000, 0x38800000, 0x477FE000, 0x47800000, 0x7F7FFFFF]
    edges += [0x38800000 - (1 << s) for s in range(24)]  # the subnormal range's steps
    near = np.concatenate([np.arange(e - 4200, e + 4200) for e in edges])
    bits = np.concatenate([near, gen.integers(0, 0x7F800000, 1_000_000)]).clip(0, 0x7F7FFFFF)
    bits = np.concatenate([bits, bits | 0x80000000]).astype(np.uint32).view(np.int32)
    bits = bits[: bits.shape[0] // 64 * 64]
    src = bits.view(np.float32).reshape(-1, 64)  # rows of 64 values
    R = src.shape[0]
    ids = np.arange(R)
    ref = torch.from_numpy(src.copy()).clamp(-65504, 65504).to(torch.float16)
    for clamp in (False, True):
        out = np.zeros((R, 1, 64), np.uint16)
        pos = np.zeros((R, 1), np.int32)
        value = np.zeros((R, 1), np.float32)
        z = np.zeros(R, np.int64)
        kernels.put_rows(src, ids, clamp, ids, z, z, out, pos, value, True)
        want = torch.where(torch.from_numpy(src) > 0, ref, 0.0).to(torch.float16) if clamp else ref
        assert np.array_equal(out[:, 0], want.view(torch.int16).numpy().view(np.uint16))
        raw = torch.from_numpy(src.copy())
        p, v = row_peak(torch.where(raw > 0, raw, 0.0) if clamp else raw)
        assert np.array_equal(pos[:, 0], p.numpy()) and np.array_equal(value[:, 0], v.numpy())
