"""Importers: checkpoints written by SAELens, sparsify and dictionary_learning themselves
(tests/fixtures/peers, with the outputs each library computed) must load and reproduce
those outputs; converted imports re-save in the native layout."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kronscope.sae import CheckpointError, ConfigError, load, save
from kronscope.sae.checkpoint import checkpoint_hash, load_checkpoint

PEERS = Path(__file__).resolve().parent.parent / "fixtures" / "peers"
FIXTURES = {
    "saelens_standard": "saelens",
    "saelens_jumprelu": "saelens",
    "saelens_topk": "saelens",
    "saelens_topk_nobdec": "saelens",
    "sparsify_topk": "sparsify",
    "dictionary_learning_topk": "dictionary_learning",
}


def close(actual: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(actual, want, atol=1e-5, rtol=1e-5)


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(PEERS / name / "expected.safetensors")


def packed(name: str, container: str, tmp_path: Path) -> Path:
    """The fixture folder as-is, or a zip / tar.gz of it (one folder inside)."""
    src = PEERS / name
    if container == "folder":
        return src
    files = sorted(p for p in src.iterdir() if p.name != "expected.safetensors")
    if container == "zip":
        out = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, f"{name}/{p.name}")
    else:
        out = tmp_path / f"{name}.tar.gz"
        with tarfile.open(out, "w:gz") as tf:
            for p in files:
                tf.add(p, arcname=f"{name}/{p.name}")
    return out


def check_outputs(sae, exp: dict[str, torch.Tensor]) -> None:
    x = exp["x"]
    with torch.no_grad():
        close(sae.encode_dense(x), exp["latents"])
        close(sae(x).x_hat, exp["reconstruction"])
        close(sae.decode_dense(exp["latents"]), exp["reconstruction"])


@pytest.mark.parametrize("container", ["folder", "zip", "tar.gz"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_peer_fixture_reproduces_library_outputs(name: str, container: str, tmp_path: Path) -> None:
    loaded = load_checkpoint(packed(name, container, tmp_path))
    assert loaded.source_format == FIXTURES[name]
    check_outputs(loaded.sae, expected(name))
    assert load(packed(name, container, tmp_path)).cfg.to_dict() == loaded.cfg.to_dict()


@pytest.mark.parametrize("name", list(FIXTURES))
def test_hash_is_the_same_for_folder_and_archives(name: str, tmp_path: Path) -> None:
    hashes = {checkpoint_hash(packed(name, c, tmp_path)) for c in ("folder", "zip", "tar.gz")}
    assert len(hashes) == 1


def test_sparsify_top_latents_match() -> None:
    exp = expected("sparsify_topk")
    sae = load(PEERS / "sparsify_topk")
    with torch.no_grad():
        values, indices = sae.encode(exp["x"])
    for row in range(exp["x"].shape[0]):
        want = {
            int(i): float(v)
            for v, i in zip(exp["top_acts"][row], exp["top_indices"][row], strict=True)
            if v > 0
        }
        got = {int(i): float(v) for v, i in zip(values[row], indices[row], strict=True) if v > 0}
        assert got.keys() == want.keys()
        for i in want:
            assert got[i] == pytest.approx(want[i], abs=1e-5, rel=1e-5)


def test_sparsify_conventions_and_metadata() -> None:
    loaded = load_checkpoint(PEERS / "sparsify_topk")
    cfg = loaded.cfg
    assert (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.k) == ("topk", 16, 64, 8)
    assert cfg.apply_b_dec_to_input  # sparsify always subtracts b_dec
    src = load_file(PEERS / "sparsify_topk" / "sae.safetensors")
    assert torch.equal(loaded.sae.W_dec, src["W_dec"])  # already [F, d]: not transposed
    assert torch.equal(loaded.sae.W_enc, src["encoder.weight"].T)
    assert "model_name" not in cfg.metadata  # sparsify records none
    assert cfg.metadata["source"]["format"] == "sparsify"
    assert cfg.metadata["source"]["cfg"] == json.loads(
        (PEERS / "sparsify_topk" / "cfg.json").read_text()
    )
    assert set(loaded.files) == {"cfg.json", "sae.safetensors"}


def test_sparsify_num_latents_zero_means_expansion_factor(tmp_path: Path) -> None:
    folder = shutil.copytree(PEERS / "sparsify_topk", tmp_path / "layers.6")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(num_latents=0, expansion_factor=4)  # 4 * 16 = 64
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_checkpoint(folder)
    assert loaded.cfg.d_sae == 64
    assert loaded.cfg.metadata["source"]["folder"] == "layers.6"
    check_outputs(loaded.sae, expected("sparsify_topk"))


def test_dictionary_learning_metadata() -> None:
    loaded = load_checkpoint(PEERS / "dictionary_learning_topk")
    meta = loaded.cfg.metadata
    assert meta["model_name"] == "gpt2"
    assert meta["hook_name"] == "blocks.6.hook_resid_post"
    assert meta["context_size"] == 128
    assert meta["source"]["format"] == "dictionary_learning"
    assert meta["source"]["config"] == json.loads(
        (PEERS / "dictionary_learning_topk" / "config.json").read_text()
    )
    assert loaded.cfg.apply_b_dec_to_input
    assert any("hook_name" in w for w in loaded.warnings)
    assert set(loaded.files) == {"config.json", "ae.pt"}


@pytest.mark.parametrize("name", ["sparsify_topk", "dictionary_learning_topk"])
@pytest.mark.parametrize("container", ["folder", "zip"])
def test_converted_import_saves_natively(name: str, container: str, tmp_path: Path) -> None:
    first = load_checkpoint(PEERS / name)
    path = save(first.sae, tmp_path / ("native.zip" if container == "zip" else "native"))
    again = load_checkpoint(path)
    assert again.source_format == "kronscope"
    assert again.cfg.to_dict() == first.cfg.to_dict()
    assert again.sha256 == first.sha256
    for key, value in first.sae.state_tensors().items():
        assert torch.equal(again.sae.state_tensors()[key], value)
    check_outputs(again.sae, expected(name))
    # The saved files have exactly the SAELens v6 layout of the SAELens TopK fixture.
    if container == "folder":
        native = json.loads((path / "cfg.json").read_text())
        peer = json.loads((PEERS / "saelens_topk" / "cfg.json").read_text())
        shared = {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "k"}
        assert {k: native[k] for k in shared} == {k: peer[k] for k in shared}
        assert native["normalize_activations"] == "none"
        ours = {k: v.shape for k, v in load_file(path / "sae_weights.safetensors").items()}
        theirs = {
            k: v.shape
            for k, v in load_file(PEERS / "saelens_topk" / "sae_weights.safetensors").items()
        }
        assert ours == theirs


# -- SAELens < 6 --------------------------------------------------------------------------
def legacy_copy(name: str, tmp_path: Path, cfg: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(PEERS / name / "sae_weights.safetensors", folder)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


LEGACY_COMMON = {
    "d_in": 16,
    "d_sae": 64,
    "dtype": "torch.float32",
    "device": "cpu",
    "model_name": "gpt2",
    "hook_point": "blocks.6.hook_resid_post",
    "hook_point_layer": 6,
    "hook_point_head_index": None,
    "context_size": 128,
    "prepend_bos": True,
    "normalize_activations": False,
    "sae_lens_version": "3.5.0",
    "finetuning_scaling_factor": False,
}


@pytest.mark.parametrize(
    ("name", "extra", "arch"),
    [
        ("saelens_topk", {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8}}, "topk"),
        ("saelens_standard", {"activation_fn_str": "relu"}, "standard"),
        ("saelens_standard", {}, "standard"),
        ("saelens_jumprelu", {}, "jumprelu"),  # inferred from the threshold tensor
    ],
)
def test_saelens_legacy_config(name: str, extra: dict, arch: str, tmp_path: Path) -> None:
    folder = legacy_copy(name, tmp_path, {**LEGACY_COMMON, **extra})
    loaded = load_checkpoint(folder)
    assert loaded.source_format == "saelens_legacy"
    cfg = loaded.cfg
    assert cfg.architecture == arch
    assert cfg.apply_b_dec_to_input  # SAELens < 6 default
    assert cfg.normalize_activations == "none"
    assert cfg.hook_name == "blocks.6.hook_resid_post"
    assert cfg.model_name == "gpt2"
    assert cfg.metadata["context_size"] == 128
    assert cfg.metadata["prepend_bos"] is True
    assert "hook_point" not in cfg.extra and "model_name" not in cfg.extra
    if arch == "topk":
        assert cfg.k == 8
    check_outputs(loaded.sae, expected(name))
    # A legacy import re-saved is read back unchanged.
    assert load_checkpoint(save(loaded.sae, tmp_path / "resaved")).sha256 == loaded.sha256


def test_saelens_legacy_boolean_normalisation(tmp_path: Path) -> None:
    cfg = {**LEGACY_COMMON, "normalize_activations": True, "norm_scaling_factor": 2.0}
    loaded = load_checkpoint(legacy_copy("saelens_standard", tmp_path, cfg))
    assert loaded.cfg.normalize_activations == "expected_average_only_in"
    assert loaded.cfg.norm_scaling_factor == 2.0


def test_saelens_legacy_scaling_factor(tmp_path: Path) -> None:
    weights = load_file(PEERS / "saelens_standard" / "sae_weights.safetensors")
    ones = tmp_path / "ones"
    ones.mkdir()
    save_file({**weights, "scaling_factor": torch.ones(64)}, ones / "sae_weights.safetensors")
    (ones / "cfg.json").write_text(json.dumps(LEGACY_COMMON))
    check_outputs(load(ones), expected("saelens_standard"))

    scale = torch.linspace(0.5, 1.5, 64)
    folded = tmp_path / "folded"
    folded.mkdir()
    save_file({**weights, "scaling_factor": scale}, folded / "sae_weights.safetensors")
    (folded / "cfg.json").write_text(
        json.dumps({**LEGACY_COMMON, "finetuning_scaling_factor": True})
    )
    loaded = load_checkpoint(folded)
    assert any("scaling factor" in w for w in loaded.warnings)
    x = expected("saelens_standard")["x"]
    f = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    with torch.no_grad():
        close(loaded.sae.encode_dense(x), f)
        close(loaded.sae(x).x_hat, (f * scale) @ weights["W_dec"] + weights["b_dec"])


def test_extra_tensors_warn(tmp_path: Path) -> None:
    folder = shutil.copytree(PEERS / "saelens_topk", tmp_path / "sae")
    weights = load_file(folder / "sae_weights.safetensors")
    save_file({**weights, "W_extra": torch.zeros(3)}, folder / "sae_weights.safetensors")
    loaded = load_checkpoint(folder)
    assert any("W_extra" in w for w in loaded.warnings)
    check_outputs(loaded.sae, expected("saelens_topk"))


def test_stray_pickle_beside_a_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = shutil.copytree(PEERS / "saelens_topk", tmp_path / "sae")
    (folder / "optimizer.pt").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: is a pickle file"):
        load_checkpoint(folder)


# -- dictionary_learning: the other dictionary classes ------------------------------------
def dl_folder(tmp_path: Path, dict_class: str, state: dict, **trainer) -> Path:
    folder = tmp_path / dict_class
    folder.mkdir()
    torch.save(state, folder / "ae.pt")
    config = {
        "trainer": {
            "dict_class": dict_class,
            "activation_dim": 16,
            "dict_size": 64,
            "lm_name": "EleutherAI/pythia-70m-deduped",
            "layer": 3,
            **trainer,
        }
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_dictionary_learning_autoencoder(tmp_path: Path) -> None:
    # relu(encoder(x - bias)), decoder(f) + bias; decoder columns not unit norm.
    state = {
        "encoder.weight": rand(64, 16, seed=1) * 0.3,
        "encoder.bias": rand(64, seed=2) * 0.1,
        "decoder.weight": rand(16, 64, seed=3) * 0.7,
        "bias": rand(16, seed=4) * 0.1,
    }
    loaded = load_checkpoint(dl_folder(tmp_path, "AutoEncoder", state))
    assert loaded.cfg.architecture == "standard"
    assert loaded.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert loaded.cfg.model_name == "EleutherAI/pythia-70m-deduped"
    x = rand(10, 16, seed=5)
    f = torch.relu((x - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
    x_hat = f @ state["decoder.weight"].T + state["bias"]
    norms = state["decoder.weight"].norm(dim=0)
    with torch.no_grad():
        close(loaded.sae(x).x_hat, x_hat)
        # As AutoEncoder.from_pretrained(normalize_decoder=True): latents times decoder norms.
        close(loaded.sae.encode_dense(x), f * norms)
    close(loaded.sae.W_dec.norm(dim=1), torch.ones(64))


def test_dictionary_learning_jumprelu(tmp_path: Path) -> None:
    state = {
        "W_enc": rand(16, 64, seed=1) * 0.3,
        "b_enc": rand(64, seed=2) * 0.1,
        "W_dec": rand(64, 16, seed=3) * 0.3,
        "b_dec": rand(16, seed=4) * 0.1,
        "threshold": torch.rand(64, generator=torch.Generator().manual_seed(6)) * 0.2,
    }
    loaded = load_checkpoint(dl_folder(tmp_path, "JumpReluAutoEncoder", state))
    assert loaded.cfg.architecture == "jumprelu"
    assert not loaded.cfg.apply_b_dec_to_input
    x = rand(10, 16, seed=5)
    pre = x @ state["W_enc"] + state["b_enc"]
    f = torch.relu(pre * (pre > state["threshold"]))
    with torch.no_grad():
        close(loaded.sae.encode_dense(x), f)
        close(loaded.sae(x).x_hat, f @ state["W_dec"] + state["b_dec"])


def test_dictionary_learning_batchtopk(tmp_path: Path) -> None:
    state = {
        "encoder.weight": rand(64, 16, seed=1) * 0.3,
        "encoder.bias": rand(64, seed=2) * 0.1,
        "decoder.weight": rand(16, 64, seed=3) * 0.3,
        "b_dec": rand(16, seed=4) * 0.1,
        "k": torch.tensor(8, dtype=torch.int32),
        "threshold": torch.tensor(0.15),
    }
    loaded = load_checkpoint(dl_folder(tmp_path, "BatchTopKSAE", state, k=8))
    assert loaded.cfg.architecture == "jumprelu"
    x = rand(10, 16, seed=5)
    post = torch.relu((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"])
    f = post * (post > 0.15)
    with torch.no_grad():
        close(loaded.sae.encode_dense(x), f)
        close(loaded.sae(x).x_hat, f @ state["decoder.weight"].T + state["b_dec"])


def test_dictionary_learning_k_must_agree(tmp_path: Path) -> None:
    state = torch.load(PEERS / "dictionary_learning_topk" / "ae.pt", weights_only=True)
    folder = dl_folder(tmp_path, "AutoEncoderTopK", state, k=5)
    with pytest.raises(Exception, match=r"ae\.pt.*'k'"):
        load(folder)


def test_sparsify_transcoder_is_refused(tmp_path: Path) -> None:
    folder = shutil.copytree(PEERS / "sparsify_topk", tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(ConfigError, match=r"cfg\.json.*'transcode'"):
        load(folder)


def test_a_checkpoint_file_stands_for_its_folder() -> None:
    for name, file in (("dictionary_learning_topk", "ae.pt"), ("sparsify_topk", "sae.safetensors")):
        check_outputs(load(PEERS / name / file), expected(name))
