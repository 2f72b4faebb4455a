"""Brute-force reference for the harvest tests: every unit's value at every token,
materialised, and every statistic computed directly from it. Independent of the streaming
code: it uses the SAE's own public encoders (``encode``, ``parents``, ``encode_dense``)
and plain sorting.

Values are compared with a tolerance (the harvest computes the encoder with a transposed
matmul, which may differ in the last bits); selections (which contexts, which tokens) and
counts are compared exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch
from torch import Tensor

from kronscope.db.codec import unpack_f16, unpack_i32, unpack_i64
from kronscope.harvest.keys import token_keys
from kronscope.harvest.params import HarvestParams
from kronscope.sae import SAE, SAEConfig, build

TINY_MODEL = "tiny-gpt2"
TINY_HOOK = "transformer.h.1"
TINY_D = 32


def tiny_sae(architecture: str, seed: int = 0, **overrides: Any) -> SAE:
    """A tiny SAE on the tiny GPT-2's layer 1 (d = 32), random but seeded."""
    fields: dict[str, Any] = {
        "architecture": architecture,
        "d_in": TINY_D,
        "metadata": {"model_name": TINY_MODEL, "hook_name": TINY_HOOK},
    }
    if architecture == "kronsae":
        fields.update(d_sae=4 * 2 * 4, k=6, h=4, m=2, n=4)
    elif architecture == "topk":
        fields.update(d_sae=48, k=5)
    else:
        fields.update(d_sae=48)
    fields.update(overrides)
    sae = build(SAEConfig(**fields))
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        # Scaled so that the tiny model's activations give a mix of active and inactive units.
        sae.W_enc.mul_(4.0)
        sae.b_enc.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
        if architecture == "jumprelu":
            sae.threshold.fill_(0.05)  # type: ignore[operator]
    return sae


@dataclass
class Units:
    """Per-token values of one unit kind: ``values`` [N, L, U] (special tokens zeroed)."""

    kind: int
    values: Tensor


def reference_units(sae: SAE, model: Any, contexts: Any, batch_size: int) -> list[Units]:
    """Every unit's value at every token, in the harvest's own batches (so the model's
    activations are the same floats)."""
    hook = sae.cfg.hook_name
    acts = torch.cat(
        [model.activations(ids, mask, hook) for _, ids, mask, _ in contexts.batches(batch_size)]
    )
    valid = (~contexts.special_mask).unsqueeze(-1).to(torch.float32)
    N, L, _ = acts.shape
    with torch.no_grad():
        if sae.sparse:
            values, indices = sae.encode(acts)
            dense = torch.zeros(N, L, sae.d_sae).scatter(-1, indices, values.float())
        else:
            dense = sae.encode_dense(acts).float()
        out = [Units(0, dense * valid)]
        if sae.cfg.architecture == "kronsae":
            p, q = sae.parents(acts)  # type: ignore[operator]
            out.append(Units(1, p.reshape(N, L, -1).float() * valid))
            out.append(Units(2, q.reshape(N, L, -1).float() * valid))
    return out


def top_reference(values: Tensor, n: int) -> list[list[tuple[int, float]]]:
    """Per unit: the n contexts with the largest max (> 0), value desc then context asc."""
    cmax = values.amax(1)  # [N, U]
    out = []
    for u in range(cmax.shape[1]):
        col = cmax[:, u].tolist()
        ranked = sorted((-v, c) for c, v in enumerate(col) if v > 0)[:n]
        out.append([(c, -v) for v, c in ranked])
    return out


def sample_reference(values: Tensor, s: int, seed: int) -> list[list[tuple[int, int]]]:
    """Per unit: the s active tokens with the smallest sampling keys."""
    N, L, U = values.shape
    keys = token_keys(seed, torch.arange(N), L)  # [N, L]
    out = []
    for u in range(U):
        active = (values[:, :, u] > 0).nonzero().tolist()
        active.sort(key=lambda cl: int(keys[cl[0], cl[1]]))
        out.append([(c, p) for c, p in active[:s]])
    return out


def histogram_reference(values: Tensor, params: HarvestParams) -> np.ndarray:
    """[U, bins] counts of the active values over the stored (left-closed) edges."""
    edges = torch.tensor(params.hist_edges(), dtype=torch.float32)
    U = values.shape[-1]
    flat = values.reshape(-1, U)
    out = np.zeros((U, params.hist_bins), dtype=np.int64)
    for u in range(U):
        v = flat[:, u]
        v = v[v > 0]
        b = (torch.bucketize(v, edges, right=True) - 1).clamp(0, params.hist_bins - 1)
        out[u] = torch.bincount(b, minlength=params.hist_bins).numpy()
    return out


# -- reading what a harvest stored -------------------------------------------------------------


def stored_rows(engine: sa.Engine, harvest_id: int) -> dict[str, Any]:
    """Everything a harvest wrote, keyed so that two harvests compare equal when their
    data is (database ids left out; contexts by position)."""
    with engine.connect() as conn:
        contexts = {
            int(pos): unpack_i32(ids).tolist()
            for pos, ids in conn.execute(
                sa.text("SELECT position, token_ids FROM context WHERE harvest_id = :h"),
                {"h": harvest_id},
            )
        }
        ctx_pos = {
            int(cid): int(pos)
            for cid, pos in conn.execute(
                sa.text("SELECT id, position FROM context WHERE harvest_id = :h"), {"h": harvest_id}
            )
        }
        tokens = dict(
            conn.execute(
                sa.text("SELECT token_id, text FROM token WHERE harvest_id = :h"), {"h": harvest_id}
            ).all()
        )
        examples = {}
        for r in conn.execute(
            sa.text(
                "SELECT unit_kind, unit_index, kind, rank, context_id, max_value, max_pos, "
                '"values", sample_pos, sample_value FROM example WHERE harvest_id = :h'
            ),
            {"h": harvest_id},
        ).mappings():
            examples[(r["unit_kind"], r["unit_index"], r["kind"], r["rank"])] = {
                "ctx": ctx_pos[int(r["context_id"])],
                "max_value": float(r["max_value"]),
                "max_pos": int(r["max_pos"]),
                "values": unpack_f16(r["values"]).tolist(),
                "sample_pos": r["sample_pos"],
                "sample_value": None if r["sample_value"] is None else float(r["sample_value"]),
            }
        stats = {}
        for r in conn.execute(
            sa.text("SELECT * FROM unit_stats WHERE harvest_id = :h"), {"h": harvest_id}
        ).mappings():
            d = dict(r)
            d.pop("harvest_id")
            if d["histogram"] is not None:
                d["histogram"] = unpack_i64(d["histogram"]).tolist()
            for key in ("histogram_edges", "logit_effects", "neighbours"):
                if isinstance(d[key], str):
                    d[key] = json.loads(d[key])
            stats[(d["unit_kind"], d["unit_index"])] = d
    return {"contexts": contexts, "tokens": tokens, "examples": examples, "stats": stats}


def full_histogram(row: dict[str, Any], params: HarvestParams) -> np.ndarray:
    """A stored (trimmed) histogram back on the harvest's full bins."""
    out = np.zeros(params.hist_bins, dtype=np.int64)
    if row["histogram"] is None:
        return out
    edges = params.hist_edges()
    first = edges.index(row["histogram_edges"][0])
    counts = row["histogram"]
    out[first : first + len(counts)] = counts
    return out


def assert_same_data(a: dict[str, Any], b: dict[str, Any], *, exact: bool = True) -> None:
    """Two stored harvests hold the same data (exactly, or values within float noise)."""
    assert a["contexts"] == b["contexts"]
    assert a["tokens"] == b["tokens"]
    assert a["examples"].keys() == b["examples"].keys()
    for key, ea in a["examples"].items():
        eb = b["examples"][key]
        if exact:
            assert ea == eb, key
        else:
            assert ea["ctx"] == eb["ctx"] and ea["max_pos"] == eb["max_pos"], key
            assert ea["sample_pos"] == eb["sample_pos"], key
            np.testing.assert_allclose(ea["values"], eb["values"], rtol=2e-3, atol=1e-4)
            np.testing.assert_allclose(ea["max_value"], eb["max_value"], rtol=1e-4, atol=1e-6)
    assert a["stats"].keys() == b["stats"].keys()
    for key, sa_ in a["stats"].items():
        sb = b["stats"][key]
        if exact:
            assert sa_ == sb, key
        else:
            for field in ("n_active", "histogram", "both_parents_active", "kept_count"):
                assert sa_[field] == sb[field], (key, field)
            for field in ("frequency", "mean_value", "max_value"):
                if sa_[field] is None:
                    assert sb[field] is None
                else:
                    np.testing.assert_allclose(sa_[field], sb[field], rtol=1e-4, atol=1e-7)
