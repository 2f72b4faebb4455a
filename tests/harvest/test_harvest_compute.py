"""The streaming pass against a brute-force reference, without a database.

Every unit's value at every token is materialised (``harvest_ref``) and top contexts,
reservoir samples, counts, sums, maxima, histograms and the KronSAE AND numbers are
computed directly; the streaming state must agree (selections and counts exactly).
Also: keys, the KronSAE TopK layout, exact shard merging, state save/load.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from harvest_ref import (
    histogram_reference,
    reference_units,
    sample_reference,
    tiny_sae,
    top_reference,
)

from kronscope.harvest import Harvester, HarvestError, HarvestParams, HarvestState, iter_batches
from kronscope.harvest.compute import kron_topk_t
from kronscope.harvest.encoder import pre_acts_t
from kronscope.harvest.keys import mix64, mix64_py, token_key_py, token_keys, top_keys
from kronscope.harvest.result import build_result
from kronscope.harvest.state import parent_units

PARAMS = HarvestParams(examples=4, samples=5, batch_size=8, seed=3)
ARCHS = ["kronsae", "topk", "jumprelu", "standard"]


def run_pass(sae, model, contexts, params=PARAMS, indices=None, chunk_elements=None):
    kw = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    h = Harvester(sae, model, params, ctx_len=contexts.input_ids.shape[1], **kw)
    state = h.new_state()
    idx = torch.arange(len(contexts)) if indices is None else indices
    for batch in iter_batches(contexts, params.batch_size, idx):
        h.process(state, batch)
        state.contexts_done += len(batch.index)
    return h, state


def block_views(sae, state):
    """(unit kind, block, column selector) for each reference unit kind."""
    views = [(0, state.latent, slice(None))]
    if state.parent is not None:
        kinds, indices = parent_units(sae.h, sae.m, sae.n)
        for kind in (1, 2):
            cols = (kinds == kind).nonzero().squeeze(1)
            order = indices[cols].argsort()
            views.append((kind, state.parent, cols[order]))
    return views


def check_against_reference(sae, model, contexts, state, params=PARAMS):
    ref = {u.kind: u.values for u in reference_units(sae, model, contexts, params.batch_size)}
    for kind, block, cols in block_views(sae, state):
        values = ref[kind]
        U = values.shape[-1]
        unit_ids = torch.arange(block.units)[cols]
        assert len(unit_ids) == U
        tops = top_reference(values, params.examples)
        samples = sample_reference(values, params.samples, params.seed)
        hist = histogram_reference(values, params)
        flat = values.reshape(-1, U)
        for u in range(U):
            b = int(unit_ids[u])
            # top contexts: same contexts in the same order, values close
            n_top = int((block.top.ctx[b] >= 0).sum())
            got = block.top.ctx[b, :n_top].tolist()
            assert got == [c for c, _ in tops[u]], (kind, u)
            if n_top:
                torch.testing.assert_close(
                    block.top.value[b, :n_top], torch.tensor([v for _, v in tops[u]])
                )
                rows = block.top.rows(torch.full((n_top,), b), torch.arange(n_top)).float()
                expect = values[torch.tensor(got), :, u]
                torch.testing.assert_close(rows, expect, rtol=2e-3, atol=1e-4)
                assert block.top.pos[b, :n_top].tolist() == expect.argmax(1).tolist()
            # reservoir: exactly the active tokens with the smallest keys
            n_s = int((block.sample.ctx[b] >= 0).sum())
            got_s = list(
                zip(
                    block.sample.ctx[b, :n_s].tolist(),
                    block.sample.pos[b, :n_s].tolist(),
                    strict=True,
                )
            )
            assert got_s == samples[u], (kind, u)
            for r, (c, p) in enumerate(got_s):
                assert float(block.sample.value[b, r]) == pytest.approx(
                    float(values[c, p, u]), rel=1e-4, abs=1e-6
                )
                assert float(values[c, p, u]) > 0
            # moments
            active = flat[:, u][flat[:, u] > 0]
            assert int(block.moments.n_active[b]) == len(active), (kind, u)
            assert float(block.moments.total[b]) == pytest.approx(
                float(active.double().sum()), rel=1e-5, abs=1e-6
            )
            expect_max = float(active.max()) if len(active) else 0.0
            assert float(block.moments.max[b]) == pytest.approx(expect_max, rel=1e-5, abs=1e-7)
            np.testing.assert_array_equal(block.moments.hist[b].numpy(), hist[u])
    if state.both_parents_active is not None:
        p, q = ref[1], ref[2]
        N, L, _ = p.shape
        pa = (p.reshape(N * L, sae.h, sae.m) > 0).float()
        qa = (q.reshape(N * L, sae.h, sae.n) > 0).float()
        both = torch.einsum("thi,thj->hij", pa, qa).reshape(-1).round().long()
        assert torch.equal(state.both_parents_active, both)
    assert state.tokens_valid == int((~contexts.special_mask).sum())
    assert state.tokens_seen == contexts.input_ids.numel()


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_equals_brute_force(arch, tiny_lm, contexts):
    sae = tiny_sae(arch)
    _, state = run_pass(sae, tiny_lm, contexts)
    # the fixture gives a real mix: some units active often, the examples rows filled
    assert int((state.latent.moments.n_active > 0).sum()) > 0
    check_against_reference(sae, tiny_lm, contexts, state)


def test_small_chunks_and_product_composition(tiny_lm, contexts):
    """One context per chunk, and the u*v ablation (parents not ReLU'd, negative values)."""
    sae = tiny_sae("kronsae", composition="product")
    _, state = run_pass(sae, tiny_lm, contexts, chunk_elements=1)
    check_against_reference(sae, tiny_lm, contexts, state)


def test_special_tokens_never_count(tiny_lm, contexts):
    sae = tiny_sae("kronsae")
    _, state = run_pass(sae, tiny_lm, contexts)
    special = contexts.special_mask
    assert special[:, 0].all()  # BOS at every context start
    assert special[:, 1:].any()  # and EOS separators inside
    for block in state.blocks():
        for kr in (block.top, block.sample):
            u, r = (kr.ctx >= 0).nonzero(as_tuple=True)
            rows = kr.rows(u, r).float()
            ctx = kr.ctx[u, r]
            assert (rows[special[ctx]] == 0).all()
        u, r = (block.sample.ctx >= 0).nonzero(as_tuple=True)
        assert not special[block.sample.ctx[u, r], block.sample.pos[u, r].long()].any()
    # the BOS really would be active without the mask
    acts = tiny_lm.activations(contexts.input_ids[:4], None, sae.cfg.hook_name)
    p, _ = sae.parents(acts)
    assert (p[:, 0] > 0).any()


def test_sharded_states_merge_exactly(tiny_lm, contexts):
    """Two shards (contexts 0::2 and 1::2) merged == one pass, whatever the merge order."""
    sae = tiny_sae("kronsae")
    params = HarvestParams(examples=4, samples=5, batch_size=1, seed=3)  # batch-invariant floats
    _, whole = run_pass(sae, tiny_lm, contexts, params)
    n = len(contexts)
    h, a = run_pass(sae, tiny_lm, contexts, params, torch.arange(0, n, 2))
    _, b = run_pass(sae, tiny_lm, contexts, params, torch.arange(1, n, 2))
    for first, second in ((a, b), (b, a)):
        merged = h.new_state()
        merged.merge(first)
        merged.merge(second)
        for name, t in whole.tensors().items():
            if name.endswith(".slot") or name.endswith(".tokens"):
                continue  # physical slots differ; rows compared in rank order below
            torch.testing.assert_close(merged.tensors()[name], t, rtol=0, atol=0, msg=name)
        for mb, wb in zip(merged.blocks(), whole.blocks(), strict=True):
            for mk, wk in ((mb.top, wb.top), (mb.sample, wb.sample)):
                assert torch.equal(mk.sorted_tokens(), wk.sorted_tokens())
        assert merged.counters() == {**whole.counters(), "contexts_done": n}


def test_state_save_load_roundtrip(tiny_lm, contexts, tmp_path):
    sae = tiny_sae("kronsae")
    h, state = run_pass(sae, tiny_lm, contexts)
    state.meta = {"run": 1}
    state.save(tmp_path, "s")
    again = h.new_state({"run": 1})
    assert again.load(tmp_path, "s")
    for name, t in state.tensors().items():
        assert torch.equal(again.tensors()[name], t), name
    assert again.counters() == state.counters()
    assert not h.new_state({"run": 1}).load(tmp_path, "missing")
    with pytest.raises(HarvestError, match="another run"):
        h.new_state({"run": 2}).load(tmp_path, "s")
    (tmp_path / "s.safetensors").write_bytes(b"garbage")
    with pytest.raises(HarvestError, match="damaged"):
        h.new_state({"run": 1}).load(tmp_path, "s")
    assert not list(tmp_path.glob("*.pkl"))


def test_keys():
    rng = random.Random(0)
    xs = [rng.getrandbits(64) - (1 << 63) for _ in range(200)] + [0, -1, 1, -(1 << 63)]
    got = mix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [mix64_py(x) for x in xs]
    keys = token_keys(7, torch.tensor([0, 5, 123456]), 9)
    assert keys[1, 4].item() == token_key_py(7, 5, 4)
    assert keys[2, 8].item() == token_key_py(7, 123456, 8)
    assert len(set(token_keys(0, torch.arange(300), 64).reshape(-1).tolist())) == 300 * 64
    assert not torch.equal(token_keys(0, torch.arange(3), 4), token_keys(1, torch.arange(3), 4))
    # top keys: value descending, then context ascending
    v = torch.tensor([0.5, 0.5, 2.0, 1e-30])
    c = torch.tensor([7, 3, 9, 1])
    order = top_keys(v, c).argsort(descending=True).tolist()
    assert order == [2, 1, 0, 3]


@pytest.mark.parametrize("composition", ["mand", "relu_product", "product"])
def test_kron_topk_layout_matches_sae(composition):
    sae = tiny_sae("kronsae", composition=composition)
    x = torch.randn(50, sae.d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = pre_acts_t(sae, x)
        torch.testing.assert_close(a, sae.pre_acts(x).t())
        if composition != "product":
            a = a.relu()
        values, indices = kron_topk_t(a, sae.h, sae.m, sae.n, sae.k, composition)
        # same algorithm on the same parents as the SAE's own encode
        av = a.view(sae.h, sae.m + sae.n, -1)
        ref_v, ref_i = sae._topk_from_parents(
            av[:, : sae.m].permute(2, 0, 1), av[:, sae.m :].permute(2, 0, 1)
        )
    torch.testing.assert_close(values, ref_v)
    dense = torch.zeros(50, sae.d_sae).scatter(1, indices, values)
    ref_dense = torch.zeros(50, sae.d_sae).scatter(1, ref_i, ref_v)
    torch.testing.assert_close(dense, ref_dense)


def test_histogram_edges_are_exact_floats():
    p = HarvestParams()
    edges = p.hist_edges()
    assert len(edges) == p.hist_bins + 1
    assert edges[0] == 2.0**-16 and edges[-1] == 2.0**16
    assert edges[1] == 2.0**-16 * 1.25
    assert all(a < b for a, b in itertools.pairwise(edges))
    assert p.to_dict()["histogram_edges"] == edges
    with pytest.raises(ValueError):
        HarvestParams(hist_bins_per_octave=3)


def test_result_layout_and_post(tiny_lm, contexts):
    """Unit kinds/indices, example ranks, logit effects (parents: summed children),
    neighbours (self excluded)."""
    sae = tiny_sae("kronsae")
    _, state = run_pass(sae, tiny_lm, contexts)
    result = build_result(state, sae, PARAMS, tiny_lm.unembed())
    latent, parents = result.units
    assert latent.unit_kind.tolist() == [0] * sae.d_sae
    kinds = sorted(zip(parents.unit_kind.tolist(), parents.unit_index.tolist(), strict=True))
    assert kinds == [(1, i) for i in range(sae.h * sae.m)] + [(2, j) for j in range(sae.h * sae.n)]
    assert latent.neighbours is not None and parents.neighbours is None
    w = sae.W_dec.detach()
    wn = w / w.norm(dim=1, keepdim=True)
    cos = wn @ wn.T
    for f in range(sae.d_sae):
        idx = [j for j, _ in latent.neighbours[f]]
        assert f not in idx
        expect = [j for j in cos[f].argsort(descending=True).tolist() if j != f][: len(idx)]
        assert idx == expect
    wu = tiny_lm.unembed()
    top_ids = [t for t, _ in latent.logit_top[3]]
    assert top_ids == (w[3] @ wu.T).topk(PARAMS.logit_effects).indices.tolist()
    # base parent (g=1, i=0): sum of its children's decoder rows
    row = next(
        i
        for i, (k, j) in enumerate(zip(parents.unit_kind, parents.unit_index, strict=True))
        if k == 1 and j == 2
    )
    children = [sae.index_of(1, 0, j) for j in range(sae.n)]
    expect = (w[children].sum(0) @ wu.T).topk(PARAMS.logit_effects).indices.tolist()
    assert [t for t, _ in parents.logit_top[row]] == expect
    assert latent.kept_count is not None and (latent.kept_count == latent.n_active).all()
    assert (latent.both_parents_active >= latent.kept_count).all()


def test_bad_inputs(tiny_lm, contexts):
    sae = tiny_sae("kronsae", d_in=24)
    h = Harvester(sae, tiny_lm, PARAMS, ctx_len=contexts.input_ids.shape[1])
    with pytest.raises(HarvestError, match=r"d_in = 24.*width 32"):
        h.check(contexts)
    sae = tiny_sae("kronsae")
    h = Harvester(sae, tiny_lm, PARAMS, ctx_len=contexts.input_ids.shape[1])

    class Fake:
        def __init__(self, ids, special):
            self.input_ids, self.special_mask = ids, special
            self.attention_mask = torch.ones_like(ids)

        def __len__(self):
            return len(self.input_ids)

    with pytest.raises(HarvestError, match="no usable tokens"):
        h.check(Fake(contexts.input_ids, torch.ones_like(contexts.special_mask)))
    with pytest.raises(HarvestError, match="no contexts"):
        h.check(Fake(contexts.input_ids[:0], contexts.special_mask[:0]))
    long_ids = torch.zeros(2, tiny_lm.max_length + 1, dtype=torch.long)
    h2 = Harvester(sae, tiny_lm, PARAMS, ctx_len=tiny_lm.max_length + 1)
    with pytest.raises(HarvestError, match="longer than the model allows"):
        h2.check(Fake(long_ids, torch.zeros_like(long_ids, dtype=torch.bool)))
    sae_no_hook = tiny_sae("kronsae", metadata={})
    with pytest.raises(HarvestError, match="hook"):
        Harvester(sae_no_hook, tiny_lm, PARAMS, ctx_len=16)


def test_state_is_bounded(tiny_lm, contexts):
    """Memory does not grow with the corpus: the state's tensors have fixed shapes."""
    sae = tiny_sae("kronsae")
    _, small = run_pass(sae, tiny_lm, contexts, indices=torch.arange(8))
    _, large = run_pass(sae, tiny_lm, contexts)
    assert {k: v.shape for k, v in small.tensors().items()} == {
        k: v.shape for k, v in large.tensors().items()
    }
    assert isinstance(small, HarvestState)
