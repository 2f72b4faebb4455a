"""``kronscope encode`` on tiny random models and SAEs written in the SAELens layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from kronscope.cli import app
from kronscope.config import Settings, get_settings
from kronscope.sae import SAEConfig, build

runner = CliRunner()


def write_sae(path: Path, cfg: SAEConfig, seed: int = 0) -> Path:
    """cfg.json + sae_weights.safetensors, as SAELens v6 writes them."""
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.add_(0.1)  # a few latents fire on random activations
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    save_file(
        {k: v.contiguous() for k, v in sae.state_tensors().items()},
        str(path / "sae_weights.safetensors"),
    )
    return path


def kron_cfg(d_in: int = 32, model: str = "tiny-gpt2", hook: str = "transformer.h.1") -> SAEConfig:
    return SAEConfig(
        architecture="kronsae",
        d_in=d_in,
        d_sae=2 * 4 * 8,
        k=4,
        h=2,
        m=4,
        n=8,
        metadata={"model_name": model, "hook_name": hook, "prepend_bos": True, "context_size": 64},
    )


@pytest.fixture()
def env(tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("KRONSCOPE_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("KRONSCOPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KRONSCOPE_DEVICE", "cpu")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture()
def kron_ckpt(tmp_path: Path) -> Path:
    return write_sae(tmp_path / "kron", kron_cfg())


def run(*args: str, input: str | None = None):
    return runner.invoke(app, ["encode", *args], input=input)


def test_encode_kronsae_table(env: Settings, kron_ckpt: Path) -> None:
    from kronscope import sae as sae_lib
    from kronscope.lm import load_model

    result = run(str(kron_ckpt), "the cat sat\ton the mat\n", "--top", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "SAE kronsae (d_in 32, d_sae 64, h 2, m 4, n 8, k 4) on model tiny-gpt2 at transformer.h.1"
    )
    assert "(head, base, extension)" in lines[1]
    assert "'<|endoftext|>' *" in lines[2]  # the BOS, marked special
    assert "'\\t'" in result.stdout or "\\t" in result.stdout  # whitespace shown visibly
    assert "'\\n'" in result.stdout
    # the numbers are the SAE's own
    subject = load_model("tiny-gpt2")
    batch = subject.tokenize(["the cat sat\ton the mat\n"])
    acts = subject.activations(batch.input_ids, None, "transformer.h.1")[0]
    sae = sae_lib.load(kron_ckpt)
    with torch.no_grad():
        values, indices = sae.top_latents(acts, 3)
    g, i, j = sae.coordinates(int(indices[1, 0]))
    assert f"{int(indices[1, 0])}={float(values[1, 0]):.4g} ({g}, {i}, {j})" in lines[3]
    assert len(lines) == 2 + batch.input_ids.shape[1] + 1  # header, legend, tokens, footnote


def test_encode_json_and_overrides(env: Settings, kron_ckpt: Path, tiny_llama_dir: Path) -> None:
    result = run(str(kron_ckpt), "the cat", "--json", "--top", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "tiny-gpt2" and data["kronsae"] == {"h": 2, "m": 4, "n": 8, "k": 4}
    assert data["tokens"][0]["special"] and not data["tokens"][1]["special"]
    for tok in data["tokens"]:
        assert len(tok["latents"]) <= 2
        for lat in tok["latents"]:
            assert lat["latent"] == lat["head"] * 32 + lat["base"] * 8 + lat["extension"]
    # another model (by folder path) and hook, same width
    result = run(
        str(kron_ckpt),
        "the cat",
        "--model",
        str(tiny_llama_dir),
        "--hook",
        "blocks.2.hook_resid_pre",
    )
    assert result.exit_code == 0, result.output
    assert "at blocks.2.hook_resid_pre" in result.stdout and "'<s>'" in result.stdout


def test_encode_topk_from_stdin(env: Settings, tmp_path: Path) -> None:
    cfg = SAEConfig(
        architecture="topk",
        d_in=32,
        d_sae=48,
        k=3,
        metadata={"model_name": "tiny-bert", "hook_name": "blocks.1.hook_resid_post"},
    )
    ckpt = write_sae(tmp_path / "topk", cfg)
    result = run(str(ckpt), "-", input="the cat sat")
    assert result.exit_code == 0, result.output
    assert "'[CLS]' *" in result.stdout and "'[SEP]' *" in result.stdout
    assert "(head, base, extension)" not in result.stdout


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_model(env: Settings, kron_ckpt: Path) -> None:
    result = run(str(kron_ckpt), "the cat", "--model", "no-such-model")
    assert_one_line_error(result, "'no-such-model'", "not found")


def test_bad_hook(env: Settings, kron_ckpt: Path) -> None:
    result = run(str(kron_ckpt), "the cat", "--hook", "transformer.h.7")
    assert_one_line_error(result, "'transformer.h.7'", "4 layers")


def test_d_in_mismatch(env: Settings, tmp_path: Path) -> None:
    ckpt = write_sae(tmp_path / "narrow", kron_cfg(d_in=16))
    result = run(str(ckpt), "the cat")
    assert_one_line_error(result, "d_in = 16", "width 32", "'tiny-gpt2'")


def test_missing_checkpoint_and_metadata(env: Settings, tmp_path: Path) -> None:
    result = run(str(tmp_path / "nowhere"), "the cat")
    assert_one_line_error(result, "nowhere")
    bare = kron_cfg()
    bare.metadata = {}
    ckpt = write_sae(tmp_path / "bare", bare)
    assert_one_line_error(run(str(ckpt), "the cat"), "metadata.model_name", "--model")
    assert_one_line_error(
        run(str(ckpt), "the cat", "--model", "tiny-gpt2"), "metadata.hook_name", "--hook"
    )
