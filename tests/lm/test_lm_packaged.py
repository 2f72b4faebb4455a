"""The packaged real models: SmolLM2-135M (GGUF, cached dequantised) and all-MiniLM-L6-v2.

Each is loaded once for this module, with a fresh data dir, so the GGUF cache is written
here (about 25 s) and then read back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from torch.testing import assert_close

from helpers.module_runs import count_runs
from kronscope.config import Settings
from kronscope.lm import (
    SubjectModel,
    TokenBatch,
    clear_model_cache,
    load_corpus,
    load_model,
    make_contexts,
)
from kronscope.lm import model as lm_model

pytestmark = pytest.mark.slow

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Sparse autoencoders find features."]


@pytest.fixture(scope="module")
def packaged_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        data_dir=tmp_path_factory.mktemp("packaged-data"), models_dir=None, device="cpu"
    )


@pytest.fixture(scope="module")
def smollm(packaged_settings: Settings) -> Iterator[SubjectModel]:
    clear_model_cache()  # load under this module's data dir, not from another test's copy
    model = load_model("smollm2-135m", settings=packaged_settings)
    yield model
    clear_model_cache()


@pytest.fixture(scope="module")
def smollm_reference(smollm: SubjectModel) -> tuple[TokenBatch, tuple[torch.Tensor, ...]]:
    """The tokenised TEXTS and their hidden states from one full forward pass."""
    batch = smollm.tokenize(TEXTS)
    with torch.no_grad():
        out = smollm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        )
    return batch, out.hidden_states


@pytest.fixture(scope="module")
def minilm(packaged_settings: Settings) -> SubjectModel:
    return load_model("minilm-l6", settings=packaged_settings)


def test_smollm_properties(smollm: SubjectModel) -> None:
    assert (smollm.is_causal_lm, smollm.layers_path, smollm.n_layers, smollm.d_model) == (
        True,
        "model.layers",
        30,
        576,
    )
    assert smollm.max_length == 8192
    batch = smollm.tokenize(TEXTS)
    assert batch.input_ids[:, 0].tolist() == [smollm.tokenizer.bos_token_id] * 2
    assert batch.tokens[0][:3] == ["<|im_start|>", "The", " quick"]
    w = smollm.unembed()
    assert w is not None and w.shape == (49152, 576)


@pytest.mark.parametrize("hook", ["model.layers.12", "blocks.12.hook_resid_post"])
def test_smollm_hook_equals_hidden_states(
    smollm: SubjectModel,
    smollm_reference: tuple[TokenBatch, tuple[torch.Tensor, ...]],
    hook: str,
) -> None:
    batch, hs = smollm_reference
    layer_paths = [f"model.layers.{i}" for i in range(30)]
    with count_runs(smollm.model, [*layer_paths, "model.norm", "lm_head"]) as counts:
        acts = smollm.activations(batch.input_ids, batch.attention_mask, hook)
    assert_close(acts, hs[13], rtol=1e-4, atol=1e-4)
    assert [counts[p] for p in layer_paths] == [1] * 13 + [0] * 17
    assert counts["model.norm"] == 0 and counts["lm_head"] == 0


def test_smollm_gguf_cache_written_and_reused(
    smollm: SubjectModel, packaged_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert smollm.source is not None and smollm.source.kind == "gguf"
    folder = lm_model.gguf_cache_path(smollm.source, packaged_settings)
    assert smollm.loaded_from == folder
    assert folder.parent == packaged_settings.cache_dir / "models"
    assert (folder / lm_model.CACHE_MARKER).is_file() and (folder / "config.json").is_file()
    assert any(folder.glob("*.safetensors"))
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temp left

    def no_rewrite(*_a: object) -> None:
        raise AssertionError("the GGUF was dequantised again instead of reusing the cache")

    monkeypatch.setattr(lm_model, "_write_gguf_cache", no_rewrite)
    clear_model_cache()
    start = time.perf_counter()
    again = load_model("smollm2-135m", settings=packaged_settings)
    elapsed = time.perf_counter() - start
    assert again is not smollm and again.loaded_from == folder
    assert elapsed < 30, f"loading from the cache took {elapsed:.1f} s"
    batch = smollm.tokenize(TEXTS[:1])
    assert_close(
        again.activations(batch.input_ids, None, "model.layers.3"),
        smollm.activations(batch.input_ids, None, "model.layers.3"),
    )


@pytest.mark.parametrize("hook", ["encoder.layer.3", "blocks.3.hook_resid_post"])
def test_minilm_hook_equals_hidden_states(minilm: SubjectModel, hook: str) -> None:
    assert (minilm.is_causal_lm, minilm.layers_path, minilm.n_layers, minilm.d_model) == (
        False,
        "encoder.layer",
        6,
        384,
    )
    batch = minilm.tokenize(TEXTS)
    assert batch.tokens[0][0] == "[CLS]" and batch.tokens[0][-1] == "[SEP]"
    with torch.no_grad():
        hs = minilm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states
    layer_paths = [f"encoder.layer.{i}" for i in range(6)]
    with count_runs(minilm.model, [*layer_paths, "pooler"]) as counts:
        acts = minilm.activations(batch.input_ids, batch.attention_mask, hook)
    assert_close(acts, hs[4], rtol=1e-4, atol=1e-4)
    assert [counts[p] for p in layer_paths] == [1, 1, 1, 1, 0, 0] and counts["pooler"] == 0


def test_builtin_contexts_with_smollm(smollm: SubjectModel) -> None:
    ctx = make_contexts(load_corpus("builtin"), smollm, 128, seed=0, max_contexts=16)
    assert ctx.input_ids.shape == (16, 128)
    assert (ctx.input_ids[:, 0] == smollm.tokenizer.bos_token_id).all()
    acts = smollm.activations(ctx.input_ids[:1], ctx.attention_mask[:1], "blocks.2.hook_resid_post")
    assert acts.shape == (1, 128, 576) and torch.isfinite(acts).all()
