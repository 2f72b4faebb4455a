"""The fused (numba) bookkeeping against the torch path: the same state, tensor for tensor.

Random activations go straight into ``Harvester.process_activations`` (no model), coarsely
rounded so that many values tie (equal context maxima, equal parents), with repeated
contexts, special tokens, several chunk sizes and enough batches for the reservoirs and
top lists to fill and then be replaced. Everything must be equal exactly, per-token rows
and their slots included; only the sums may differ by rounding (the torch path adds each
chunk in float32, the kernel in float64).
"""

from __future__ import annotations

import pytest
import torch
from harvest_ref import TINY_D, tiny_sae

from kronscope.harvest import Harvester, HarvestError, HarvestParams
from kronscope.harvest.compute import load_fused
from kronscope.harvest.state import HarvestState

pytestmark = pytest.mark.skipif(load_fused() is None, reason="numba is not installed")

L = 8
PARAMS = HarvestParams(examples=3, samples=4, batch_size=6, seed=5)
CASES = [
    ("kronsae", {}),
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
        table = torch.randn(n, length, generator=gen)
        pos = torch.randint(0, length, (n,), generator=gen) if with_pos else None
        value = torch.randn(n, generator=gen) if with_pos else None
        ref.offer(unit, key, ctx, value, lambda ids, t=table: t[ids], pos)
        h._offer(got, unit, key, ctx, value, lambda ids, t=table: t[ids], pos)
        for name in KeyedTop.FIELDS:
            assert torch.equal(getattr(got, name), getattr(ref, name)), (n, name)
